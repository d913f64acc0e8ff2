"""`mnistsum sweep`: Optuna studies whose trials are training runs. study (the command), plan
(what a sweep is, its devices, the study checked to be its own), storage (the Optuna database),
worker (trials on one device), summary (a study as lines and rows), space, pruning and plots.
Imports the layers below it (training, data, store, base); never serve or the CLI: its lines go
through mnistsum_cli.terminal, its tables are drawn by cli/listings.py."""
