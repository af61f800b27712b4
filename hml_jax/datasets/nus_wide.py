"""NUS-WIDE as Cole et al. use it ("Multi-label learning from single positive labels", CVPR 2021;
the paper's NUS-WIDE): 81 concepts.

Two on-disk formats, tried in this order:
1. Cole et al.'s own subset (they re-crawled the Flickr images and publish no script, only the
   result): `formatted_{train,val}_{images,labels}.npy` in the manual_dir, 150,000 train / 60,260
   test images. 'train' = formatted_train, 'test' = formatted_val, rows as stored; labels are
   their 0/1 float matrix; filenames are the stored paths. Each image path is resolved relative to
   the manual_dir, or to manual_dir/Flickr if it is not there (Cole et al.'s loader reads
   Flickr/<path>). Label names come from `Concepts81.txt` in the manual_dir if present (one name
   per line, in label order), else 'concept_0'..'concept_80'.
2. The official NUS-WIDE lists, used when no formatted_*.npy file is present:
   `ImageList/{Train,Test}Imagelist.txt` (paths such as `actor\\0001_2124494179.jpg`, relative
   to `Flickr/`), `Groundtruth/TrainTestLabels/Labels_<concept>_{Train,Test}.txt` (one 0/1 per
   line, aligned with the image list) and `Concepts81.txt` (label order). Kept: the images whose
   file exists under Flickr/ (many of the original Flickr images can no longer be crawled; how
   many were missing is logged) and that have at least one positive, in list order. Filenames are
   the list's paths with '/' separators, relative to Flickr/. This is not Cole et al.'s subset:
   their rows are not reproducible from the official files.
"""
import os
from typing import List, Tuple

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from hml_jax.datasets import common

NUM_LABELS = 81
FORMATTED_SPLITS = {'train': 'train', 'test': 'val'}
OFFICIAL_SPLITS = {'train': 'Train', 'test': 'Test'}

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Put either of these two layouts in the manual_dir (by default <data_dir>/downloads/manual).
(1) Cole et al.'s re-crawled subset, as their data/nuswide folder
    (https://github.com/elijahcole/single-positive-multi-label/tree/main/data):
  <manual_dir>/formatted_train_images.npy, formatted_train_labels.npy,
               formatted_val_images.npy, formatted_val_labels.npy
      (from https://zenodo.org/records/10162606)
  <manual_dir>/Flickr/<path stored in formatted_*_images.npy>
      (Flickr.zip from the NUS-WIDE authors, unzipped in the manual_dir)
  <manual_dir>/Concepts81.txt (optional: label names, one per line)
(2) The official NUS-WIDE files (https://lms.comp.nus.edu.sg/wp-content/uploads/2019/research/
    nuswide/NUS-WIDE.html), used only if no formatted_*.npy file is there:
  <manual_dir>/ImageList/TrainImagelist.txt and TestImagelist.txt
  <manual_dir>/Groundtruth/TrainTestLabels/Labels_<concept>_Train.txt and _Test.txt
  <manual_dir>/Concepts81.txt
  <manual_dir>/Flickr/<concept folder>/<image>.jpg
"""


def _require(path):
  return common.require_path(path, NusWide.name, MANUAL_DOWNLOAD_INSTRUCTIONS)


def formatted_paths(root, split: str) -> Tuple[str, str]:
  """(images .npy, labels .npy) of split in Cole et al.'s format."""
  prefix = os.path.join(os.fspath(root), f'formatted_{FORMATTED_SPLITS[split]}')
  return prefix + '_images.npy', prefix + '_labels.npy'


def detect_format(root) -> str:
  """'formatted' if any formatted_*.npy file is in root, else 'official' if ImageList/ is."""
  root = os.fspath(root)
  formatted = [p for split in ('train', 'test') for p in formatted_paths(root, split)]
  if any(os.path.exists(p) for p in formatted):
    for path in formatted:
      _require(path)
    return 'formatted'
  image_list = os.path.join(root, 'ImageList')
  if os.path.exists(image_list):
    return 'official'
  raise FileNotFoundError(
      f'{NusWide.name}: expected {formatted[0]} (and the other formatted_*.npy files) or '
      f'{image_list}; neither exists. Place the dataset in the manual_dir as its '
      f'MANUAL_DOWNLOAD_INSTRUCTIONS say:\n{MANUAL_DOWNLOAD_INSTRUCTIONS}')


def read_concepts(root, required: bool) -> List[str]:
  """The 81 names of Concepts81.txt (one per line); 'concept_<i>' if absent and not required."""
  path = os.path.join(os.fspath(root), 'Concepts81.txt')
  if not os.path.exists(path) and not required:
    return [f'concept_{i}' for i in range(NUM_LABELS)]
  with open(_require(path)) as f:
    names = [line.strip() for line in f if line.strip()]
  if len(names) != NUM_LABELS or len(set(names)) != NUM_LABELS:
    raise ValueError(f'{path}: expected {NUM_LABELS} distinct concept names, one per line, got '
                     f'{len(names)} ({len(set(names))} distinct)')
  return names


def _load_npy(path: str) -> np.ndarray:
  try:
    return np.load(path, allow_pickle=False)
  except ValueError:
    # An object array (e.g. of Python strings) needs pickle; these are the published files the
    # user placed in the manual_dir.
    return np.load(path, allow_pickle=True)


def read_formatted(root, split: str) -> Tuple[List[str], np.ndarray, List[str]]:
  images_path, labels_path = formatted_paths(root, split)
  images = _load_npy(_require(images_path))
  labels = _load_npy(_require(labels_path))
  if images.ndim != 1:
    raise ValueError(f'{images_path}: expected a 1-D array of paths, got shape {images.shape}')
  if labels.shape != (len(images), NUM_LABELS):
    raise ValueError(f'{labels_path}: expected shape ({len(images)}, {NUM_LABELS}) to match '
                     f'{images_path}, got {labels.shape}')
  not_binary = np.argwhere((labels != 0) & (labels != 1))
  if len(not_binary):
    row, column = not_binary[0]
    raise ValueError(f'{labels_path}: labels must be 0 or 1, row {row} column {column} is '
                     f'{labels[row, column]!r}')
  filenames = [x.decode() if isinstance(x, bytes) else str(x) for x in images]
  return filenames, labels.astype(np.uint8), read_concepts(root, required=False)


def read_official(root, split: str) -> Tuple[List[str], np.ndarray, List[str]]:
  root = os.fspath(root)
  official = OFFICIAL_SPLITS[split]
  names = read_concepts(root, required=True)
  list_path = _require(os.path.join(root, 'ImageList', f'{official}Imagelist.txt'))
  with open(list_path) as f:
    paths = [line.strip().replace('\\', '/') for line in f if line.strip()]
  labels = np.zeros((len(paths), NUM_LABELS), np.uint8)
  for column, name in enumerate(names):
    path = _require(
        os.path.join(root, 'Groundtruth', 'TrainTestLabels', f'Labels_{name}_{official}.txt'))
    values = []
    with open(path) as f:
      for line_number, line in enumerate(f, 1):
        value = line.strip()
        if not value:
          continue
        if value not in ('0', '1'):
          raise common.line_error(path, line_number, line, '0 or 1')
        values.append(value == '1')
    if len(values) != len(paths):
      raise ValueError(f'{path} has {len(values)} labels, {list_path} {len(paths)} images')
    labels[:, column] = values
  flickr = os.path.join(root, 'Flickr')
  exists = np.array([os.path.exists(os.path.join(flickr, p)) for p in paths], bool)
  keep = exists & labels.any(1)
  logging.info(
      '%s %s: %d of the %d images in %s are missing under %s; %d of the rest have no '
      'positive label. Keeping %d.', NusWide.name, split, np.sum(~exists), len(paths), list_path,
      flickr, np.sum(exists & ~labels.any(1)), np.sum(keep))
  return [p for p, k in zip(paths, keep) if k], labels[keep], names


def read_split(root, split: str) -> Tuple[List[str], np.ndarray, List[str]]:
  """(filenames, labels (n, 81) uint8, concept names) of 'train' or 'test'; see the module
  docstring for the two formats."""
  common.check_split(split)
  if detect_format(root) == 'formatted':
    return read_formatted(root, split)
  return read_official(root, split)


def resolve_image(root, filename: str) -> str:
  """root/filename if it exists, else root/Flickr/filename; ValueError naming both if neither."""
  candidates = [
      os.path.join(os.fspath(root), filename),
      os.path.join(os.fspath(root), 'Flickr', filename)
  ]
  for path in candidates:
    if os.path.isfile(path):
      return path
  raise ValueError(f'{NusWide.name}: image {filename!r} found neither at {candidates[0]} nor '
                   f'at {candidates[1]}')


class NusWide(tfds.core.GeneratorBasedBuilder):
  """NUS-WIDE (81 concepts) in Cole et al.'s format, from the manual_dir."""

  name = 'hml_nus_wide'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=common.features(NUM_LABELS),
        supervised_keys=None,
        homepage=('https://lms.comp.nus.edu.sg/wp-content/uploads/2019/research/nuswide/'
                  'NUS-WIDE.html'),
        # The concept names come from Concepts81.txt: filled in when prepared.
        metadata=tfds.core.MetadataDict(label_names=[]),
    )

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    splits = {split: read_split(root, split) for split in ('train', 'test')}
    self.info.metadata['label_names'] = splits['train'][2]
    return {
        split: self._generate_examples(filenames, labels, root)
        for split, (filenames, labels, _) in splits.items()
    }

  def _generate_examples(self, filenames, labels, root):
    return common.generate_examples(filenames, labels, lambda f: resolve_image(root, f))
