"""The artifacts on disk: where each lives (paths), how it is read without trusting it
(diskfiles), how a folder changes (locks: one writer; transactions: one commit, through journal,
renames and writes; recovery: what a killed writer left; interrupts: Ctrl-C held back) and is
read consistently (reads), hashed (fingerprints), declared (validation, schemas; schema_docs
renders docs/schemas.md), and the two binary formats, safetensors (tensorfiles) and Parquet
(splits). Imports only the base modules (errors, settings, terminal); never torch at import
time."""
