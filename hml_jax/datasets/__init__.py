"""Datasets: TFDS builders and loaders. Importing a builder module registers it with TFDS."""
