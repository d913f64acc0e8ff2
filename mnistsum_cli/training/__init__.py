"""Training a model: the architectures, device and precision policy, torchrun, the epoch loop,
running a model over a split (the loop's validation and `evaluate` share it), checkpoints and
resume, a run folder's life, training metrics and TensorBoard events. Imports data, the store
and the base modules."""
