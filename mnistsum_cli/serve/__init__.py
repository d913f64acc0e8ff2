"""`mnistsum serve`: the web page and its JSON API over a run folder, and its worker processes.
By job: lifecycle (start-up, deadlines, shutdown; the entry point, `lifecycle.serve`), app (the
routes and what guards them), parsing (request bodies, forms and uploads into the model's
input), batching (the forward passes), follower (the model that follows the folder), card (the
run card), logs, workers (the forked processes), static (the page's files).
Imports evaluation, training, data, the store and the base modules; never sweep or the CLI."""
