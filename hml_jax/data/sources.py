"""What a dataset provides before Cole et al.'s protocol (hml_jax/training/input_pipeline.py): the official
train and test label matrices and the examples in memory or a record reader per split. Every
loader (hml_jax/datasets/) returns one; hml_jax/datasets/registry.py picks the loader by name.
"""
import dataclasses
from typing import Any, Dict, List, Optional, Union

import numpy as np

from hml_jax.data.splits import RecordReader


@dataclasses.dataclass
class Source:
  """What a dataset provides before the protocol: the official train and test label matrices
  (rows in the official order) and either the examples in memory or a record reader per split."""
  name: str
  train_labels: np.ndarray
  test_labels: np.ndarray
  label_names: List[str]
  train_examples: Optional[np.ndarray] = None  # in memory: (N, ...) by official row
  test_examples: Optional[np.ndarray] = None
  # Streamed: a RecordReader (tf.data) or a grain_splits.IndexedRecords (array_record, grain).
  train_records: Optional[Union[RecordReader, Any]] = None
  test_records: Optional[Union[RecordReader, Any]] = None
  exact_shuffle: bool = False
  validation_labels: Optional[np.ndarray] = None  # features .npz with its own val_* split
  validation_examples: Optional[np.ndarray] = None
  # A generated dataset's {split: digest of its pixels and labels} (datasets/digests.py).
  digests: Optional[Dict[str, str]] = None
