"""The artifacts on disk: where each lives (paths), how it is read without trusting it (diskfiles),
committed and read consistently (transactions), hashed (fingerprints), declared (schemas), and the
two binary formats, safetensors and Parquet. Imports only the base modules (errors, settings,
terminal); never torch at import time."""
