"""MNIST and the prepared splits: reading (and downloading) MNIST, the `prepare` stage, the data a
command works on (read once), and the splits as device tensors. Imports the store and the base
modules."""
