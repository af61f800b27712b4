"""CUB-200-2011 attributes as Cole et al. format them ("Multi-label learning from single
positive labels", CVPR 2021; the paper's CUB): 312 binary attributes per image, official train as
'train', official test as 'test'.

Cole et al.'s procedure (their preproc/format_cub.py), reproduced by `read_split`: the label of
(image, attribute) is the `is_present` field of `attributes/image_attribute_labels.txt`, whatever
its certainty; rows follow `images.txt`; train = `is_train` 1 in `train_test_split.txt`, test =
the rest. Their script reads the three files positionally (the k-th block of 312 attribute lines
belongs to the k-th line of images.txt); this module places each attribute line by its
(image_id, attribute_id) instead and errors if any pair is missing or duplicated, which gives the
same matrix on the official files (sorted and complete) and refuses anything else. A few lines of
the official image_attribute_labels.txt carry an extra field, so only the first three fields
(image_id attribute_id is_present) are parsed. Attribute names come from `attributes.txt`.
Filenames are the paths of images.txt, relative to CUB_200_2011/images (as Cole et al. store
them). The paper reports 5,994 train / 5,794 test images, 31.47 positives per image.
"""
import array
import os
from typing import Dict, List, Tuple

import numpy as np

from hml_jax.datasets import common
from hml_jax.runtime import errors

NUM_LABELS = 312

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download CUB_200_2011.tgz from https://www.vision.caltech.edu/datasets/cub_200_2011/ and extract
it in the manual_dir (by default <data_dir>/downloads/manual):
  tar -xzf CUB_200_2011.tgz -C <manual_dir>
so that these exist:
  <manual_dir>/CUB_200_2011/images.txt
  <manual_dir>/CUB_200_2011/train_test_split.txt
  <manual_dir>/CUB_200_2011/attributes/image_attribute_labels.txt
  <manual_dir>/CUB_200_2011/images/<path in images.txt>
and the attribute names, attributes.txt, at either <manual_dir>/attributes.txt (where Cole et al.
read it) or <manual_dir>/CUB_200_2011/attributes/attributes.txt.
"""


def _require(path):
  return common.require_path(path, Cub.name, MANUAL_DOWNLOAD_INSTRUCTIONS)


def _read_id_table(path: str, value_name: str, allowed=None) -> Dict[int, str]:
  """'<id> <value>' lines with ids 1..n in order -> {id: value}; value in allowed if given."""
  table = {}
  with open(path) as f:
    for line_number, line in enumerate(f, 1):
      fields = line.split()
      if not fields:
        continue
      if (len(fields) != 2 or not fields[0].isdigit() or int(fields[0]) != len(table) + 1 or
          (allowed is not None and fields[1] not in allowed)):
        raise common.line_error(path, line_number, line,
                                f'"<id> <{value_name}>" with id {len(table) + 1}')
      table[int(fields[0])] = fields[1]
  return table


def attribute_names_path(root) -> str:
  """attributes.txt: at the manual_dir level (Cole et al.'s layout) or under the attributes/."""
  candidates = [
      os.path.join(os.fspath(root), 'attributes.txt'),
      os.path.join(os.fspath(root), 'CUB_200_2011', 'attributes', 'attributes.txt')
  ]
  for path in candidates:
    if os.path.exists(path):
      return path
  raise errors.MissingInputError(
      f'{Cub.name}: expected attributes.txt at {candidates[0]} or {candidates[1]}; neither '
      f'exists. Place the dataset in the manual_dir as its MANUAL_DOWNLOAD_INSTRUCTIONS say:\n'
      f'{MANUAL_DOWNLOAD_INSTRUCTIONS}')


def read_attribute_labels(path: str, num_images: int) -> np.ndarray:
  """image_attribute_labels.txt -> (num_images, 312) uint8, row image_id - 1, column
  attribute_id - 1. Every (image, attribute) must appear exactly once."""
  image_ids, attribute_ids, present, line_numbers = (array.array('l') for _ in range(4))
  with open(path) as f:
    for line_number, line in enumerate(f, 1):
      fields = line.split()
      if not fields:
        continue
      if (len(fields) < 3 or not fields[0].isdigit() or not fields[1].isdigit() or
          fields[2] not in ('0', '1')):
        raise common.line_error(path, line_number, line,
                                '"<image_id> <attribute_id> <is_present 0 or 1> ..."')
      image_ids.append(int(fields[0]))
      attribute_ids.append(int(fields[1]))
      present.append(fields[2] == '1')
      line_numbers.append(line_number)
  image_ids, attribute_ids, present, line_numbers = (
      np.asarray(a, np.int64) for a in (image_ids, attribute_ids, present, line_numbers))
  bad = np.nonzero((image_ids < 1) | (image_ids > num_images) | (attribute_ids < 1) |
                   (attribute_ids > NUM_LABELS))[0]
  if len(bad):
    raise errors.InvalidInputError(
        f'{path}, line {line_numbers[bad[0]]}: image_id {image_ids[bad[0]]} or '
        f'attribute_id {attribute_ids[bad[0]]} outside 1..{num_images} / '
        f'1..{NUM_LABELS}')
  counts = np.zeros((num_images, NUM_LABELS), np.int64)
  np.add.at(counts, (image_ids - 1, attribute_ids - 1), 1)
  if np.any(counts > 1):
    image, attribute = np.argwhere(counts > 1)[0] + 1
    lines = line_numbers[(image_ids == image) & (attribute_ids == attribute)]
    raise errors.InvalidInputError(
        f'{path}: (image_id {image}, attribute_id {attribute}) appears more than '
        f'once, on lines {list(lines)}')
  if np.any(counts == 0):
    image, attribute = np.argwhere(counts == 0)[0] + 1
    raise errors.InvalidInputError(
        f'{path}: no line for (image_id {image}, attribute_id {attribute}); '
        f'expected one line per image and attribute')
  labels = np.zeros((num_images, NUM_LABELS), np.uint8)
  labels[image_ids - 1, attribute_ids - 1] = present
  return labels


def read_splits(root) -> Dict[str, Tuple[List[str], np.ndarray, List[str]]]:
  """{'train': read_split(root, 'train'), 'test': read_split(root, 'test')}, parsing the
  3.7M-line label file (a few seconds) once."""
  base = os.path.join(os.fspath(root), 'CUB_200_2011')
  images_path = _require(os.path.join(base, 'images.txt'))
  split_path = _require(os.path.join(base, 'train_test_split.txt'))
  labels_path = _require(os.path.join(base, 'attributes', 'image_attribute_labels.txt'))
  names_path = attribute_names_path(root)

  images = _read_id_table(images_path, 'image path')
  is_train = _read_id_table(split_path, 'is_training_image 0 or 1', allowed=('0', '1'))
  if len(is_train) != len(images):
    raise errors.InvalidInputError(
        f'{split_path} lists {len(is_train)} images, {images_path} {len(images)}')
  names = list(_read_id_table(names_path, 'attribute name').values())
  if len(names) != NUM_LABELS:
    raise errors.InvalidInputError(
        f'{names_path}: expected {NUM_LABELS} attributes, got {len(names)}')
  labels = read_attribute_labels(labels_path, len(images))
  splits = {}
  for split, keep in (('train', '1'), ('test', '0')):
    image_ids = [image_id for image_id in images if is_train[image_id] == keep]
    splits[split] = ([images[i] for i in image_ids], labels[np.array(image_ids, int) - 1],
                     list(names))
  return splits


def read_split(root, split: str) -> Tuple[List[str], np.ndarray, List[str]]:
  """(filenames, labels (n, 312) uint8, attribute names) of 'train' or 'test', in images.txt
  order."""
  common.check_split(split)
  return read_splits(root)[split]


class Cub(common.PaperDatasetBuilder):
  """CUB-200-2011 image attributes in Cole et al.'s format, from the manual_dir (the attribute
  names from attributes.txt)."""

  name = 'hml_cub'
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  NUM_LABELS = NUM_LABELS
  HOMEPAGE = 'https://www.vision.caltech.edu/datasets/cub_200_2011/'

  def read_splits(self, root):
    return read_splits(root)

  def image_path(self, root, filename):
    return os.path.join(root, 'CUB_200_2011', 'images', filename)
