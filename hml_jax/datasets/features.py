"""Features mode (Cole et al.'s linear_fixed_features): precomputed features in an .npz file.

Keys: train_features (N, D), train_labels (N, L) 0/1, test_features (M, D), test_labels (M, L);
optional val_features / val_labels (else 20% of train becomes validation, Cole et al.'s split);
optional label_names (L,) strings. `python -m hml_jax.extract_features` writes such a file.
Select it with configs/features.py and --config.dataset.path=FILE.npz.
"""
import os

import numpy as np

from hml_jax.data import npz_files
from hml_jax.data import sources
from hml_jax.runtime import errors

REQUIRED_KEYS = ('train_features', 'train_labels', 'test_features', 'test_labels')


def _matrix(arrays, key, path, dtype):
  value = np.asarray(arrays[key])
  if value.ndim != 2:
    raise errors.InvalidInputError(
        f'{path}: {key!r} must be a 2-D array (one row per example), got shape {value.shape}.')
  if not len(value):
    raise errors.InvalidInputError(f'{path}: {key!r} is empty: the split has no example.')
  if dtype != np.float32:  # labels: check the stored values, before any cast
    bad = ~np.isin(value, (0, 1))
    if bad.any():
      row, column = np.argwhere(bad)[0]
      raise errors.InvalidInputError(f'{path}: {key!r} must hold only 0 and 1; found '
                                     f'{value[row, column].item()!r} at row {row}, label {column}.')
    return value.astype(dtype)
  if value.dtype.kind not in 'biuf':
    raise errors.InvalidInputError(
        f'{path}: {key!r} has dtype {value.dtype}; features must be numbers.')
  # Finite after the cast: a float64 1e300 is finite as stored and inf in float32.
  with np.errstate(over='ignore', invalid='ignore'):
    cast = value.astype(np.float32)
  bad = ~np.isfinite(cast)
  if bad.any():
    row, column = np.argwhere(bad)[0]
    stored = value[row, column].item()
    overflow = ('' if not np.isfinite(stored) else
                f', which float32 (what training uses, at most {np.finfo(np.float32).max:.4g}) '
                'cannot hold: it becomes inf')
    raise errors.InvalidInputError(
        f'{path}: {key!r} has a non-finite value in row {row}, column {column}: {stored!r}'
        f'{overflow}. Fix or drop that row, or rescale the features.')
  return cast


def _read_npz(path: str) -> dict:
  """Every array of the .npz at path, without pickles, in memory bounded by the file
  (hml_jax.data.npz_files); errors naming the file (and the key)."""
  return npz_files.read_arrays(path, ' (config.dataset.path)',
                               'write it again with numpy.savez (docs/datasets.md, features mode)')


def load_source(dataset_config):
  """The sources.Source of an .npz of features (held in memory)."""
  path = dataset_config.path
  if not path:
    raise errors.InvalidInputError("config.dataset.path is empty: features mode needs an .npz file "
                                   "(--config.dataset.path=FILE.npz).")
  if not os.path.isfile(path):
    raise errors.MissingInputError(f'Features file {path} (config.dataset.path) does not exist.')
  arrays = _read_npz(path)
  missing = [key for key in REQUIRED_KEYS if key not in arrays]
  has_validation = 'val_features' in arrays or 'val_labels' in arrays
  if has_validation and not ('val_features' in arrays and 'val_labels' in arrays):
    missing.append('val_labels' if 'val_features' in arrays else 'val_features')
  if missing:
    raise errors.InvalidInputError(
        f'{path} lacks {missing}; it has {sorted(arrays)}. Expected '
        f'{list(REQUIRED_KEYS)} and optionally val_features, val_labels, label_names.')
  splits = ('train', 'test') + (('val',) if has_validation else ())
  features = {split: _matrix(arrays, f'{split}_features', path, np.float32) for split in splits}
  labels = {split: _matrix(arrays, f'{split}_labels', path, np.int32) for split in splits}
  dimensions = {f.shape[1] for f in features.values()}
  num_labels = {matrix.shape[1] for matrix in labels.values()}
  if len(dimensions) > 1 or len(num_labels) > 1:
    raise errors.InvalidInputError(
        f'{path}: the splits disagree on the feature dimension {sorted(dimensions)} '
        f'or the number of labels {sorted(num_labels)}.')
  for split in splits:
    if len(features[split]) != len(labels[split]):
      raise errors.InvalidInputError(
          f'{path}: {split}_features has {len(features[split])} rows but '
          f'{split}_labels has {len(labels[split])}.')
  label_names = [str(n) for n in arrays['label_names']
                ] if 'label_names' in arrays else [str(i) for i in range(labels['train'].shape[1])]
  if len(label_names) != labels['train'].shape[1]:
    raise errors.InvalidInputError(
        f'{path}: {len(label_names)} label_names for {labels["train"].shape[1]} '
        'labels.')
  return sources.Source(name=path,
                        train_labels=labels['train'],
                        test_labels=labels['test'],
                        label_names=label_names,
                        train_examples=features['train'],
                        test_examples=features['test'],
                        validation_labels=labels.get('val'),
                        validation_examples=features.get('val'))
