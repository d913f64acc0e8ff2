"""Using a trained model: running it over a split or on images (torch or onnxruntime), the
`evaluate` stage and the figures of `plot` and `compare`. Imports training, data, the store and
the base modules."""
