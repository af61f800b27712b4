"""Shared test helpers: the tiny config pointed at a per-session TFDS data_dir."""
import json
import os

from hml_jax.configs import tiny

TIMING_KEYS = ('train_images_per_sec', 'wall_seconds')


def tiny_config(data_dir, **overrides):
  config = tiny.get_config()
  config.dataset.data_dir = str(data_dir)
  for key, value in overrides.items():
    config[key] = value
  return config


def read_results(workdir, drop_timing=True):
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  if drop_timing:
    for key in TIMING_KEYS:
      results.pop(key)
  return results
