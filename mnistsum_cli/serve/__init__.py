"""`mnistsum serve`: the web page and its JSON API over a run folder, and its worker processes.
Imports evaluation, training, data, the store and the base modules; never sweep or the CLI."""
