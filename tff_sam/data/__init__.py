"""Data: finding and reading image/mask pairs, the embedded datasets, SAM
preprocessing, prompt sampling, the embedding cache and TFF's client pipelines."""
