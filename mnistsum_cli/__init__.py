"""mnistsum: predict an MNIST digit and its sum with a random number."""

__version__ = "0.1.0"
