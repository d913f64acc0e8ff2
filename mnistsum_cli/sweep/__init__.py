"""`mnistsum sweep`: Optuna studies whose trials are training runs, the search space, pruning and
the study's plots. Imports the layers below it (training, data, store, base); never serve or the
CLI."""
