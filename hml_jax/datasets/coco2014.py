"""MS-COCO 2014 as Cole et al. format it ("Multi-label learning from single positive labels",
CVPR 2021; the paper's COCO): 80 labels, train2014 as 'train', val2014 as 'test'.

Cole et al.'s procedure (their preproc/format_coco.py), reproduced exactly by `read_split`:
- label index = position of the category in `annotations/instances_<split>2014.json`'s
  'categories' list. Cole et al. take the file's order; the official files list the categories
  sorted by id (1..90 with gaps), and this module takes them sorted by id, warning if a file's
  order differs. The builder checks that train and val list the same categories.
- images = those with at least one annotation (images without one are dropped), ordered by image
  id sorted *as strings* ('10' < '9'), a quirk of Cole et al.'s script kept for row-by-row
  compatibility with their formatted files;
- an image is positive for every category of any of its annotations (crowd ones included).
Filenames are `<split>2014/COCO_<split>2014_<id:012d>.jpg`, relative to the manual_dir, built
from the image id as Cole et al. do (the JSON's file_name is not read). The paper reports
82,081 train / 40,137 test images.
"""
import json
import os
from typing import List, Tuple

from absl import logging
import numpy as np

from hml_jax.datasets import common
from hml_jax.runtime import errors

NUM_LABELS = 80
OFFICIAL_SPLITS = {'train': 'train', 'test': 'val'}

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download annotations_trainval2014.zip, train2014.zip and val2014.zip from
https://cocodataset.org/#download and unzip all three in the manual_dir (by default
<data_dir>/downloads/manual), so that these exist:
  <manual_dir>/annotations/instances_train2014.json
  <manual_dir>/annotations/instances_val2014.json
  <manual_dir>/train2014/COCO_train2014_<12-digit image id>.jpg
  <manual_dir>/val2014/COCO_val2014_<12-digit image id>.jpg
"""


def read_instances(root, split: str) -> Tuple[List[str], np.ndarray, List[Tuple[int, str]]]:
  """(filenames, labels (n, 80) uint8, categories) of 'train' (train2014) or 'test' (val2014);
  categories are the (id, name) pairs in label order. See the module docstring for the order."""
  common.check_split(split)
  official = OFFICIAL_SPLITS[split]
  path = common.require_path(
      os.path.join(os.fspath(root), 'annotations', f'instances_{official}2014.json'), Coco2014.name,
      MANUAL_DOWNLOAD_INSTRUCTIONS)
  with open(path) as f:
    data = json.load(f)
  try:
    categories = [(int(c['id']), str(c['name'])) for c in data['categories']]
    annotations = [(int(a['image_id']), int(a['category_id'])) for a in data['annotations']]
  except (KeyError, TypeError, ValueError) as error:
    raise errors.InvalidInputError(
        f'{path}: malformed categories or annotations ({error!r})') from error
  if len(categories) != NUM_LABELS or len({i for i, _ in categories}) != NUM_LABELS:
    raise errors.InvalidInputError(
        f'{path}: expected {NUM_LABELS} categories with distinct ids, got '
        f'{len(categories)} with ids {sorted(i for i, _ in categories)}')
  if categories != sorted(categories):
    logging.warning(
        '%s lists its categories out of id order; Cole et al. index them in file '
        'order, this module in id order.', path)
  categories = sorted(categories)
  category_index = {category_id: i for i, (category_id, _) in enumerate(categories)}

  image_ids = sorted({str(image_id) for image_id, _ in annotations})  # Cole's string order
  row_of = {int(image_id): row for row, image_id in enumerate(image_ids)}
  labels = np.zeros((len(image_ids), NUM_LABELS), np.uint8)
  for number, (image_id, category_id) in enumerate(annotations):
    if category_id not in category_index:
      raise errors.InvalidInputError(
          f'{path}: annotation {number} (image {image_id}) has category_id '
          f'{category_id}, which is not in the categories list')
    labels[row_of[image_id], category_index[category_id]] = 1
  filenames = [f'{official}2014/COCO_{official}2014_{int(i):012d}.jpg' for i in image_ids]
  return filenames, labels, categories


def read_split(root, split: str) -> Tuple[List[str], np.ndarray, List[str]]:
  """(filenames, labels (n, 80) uint8, label_names) in Cole et al.'s row order."""
  filenames, labels, categories = read_instances(root, split)
  return filenames, labels, [name for _, name in categories]


class Coco2014(common.PaperDatasetBuilder):
  """MS-COCO 2014 multi-label classification in Cole et al.'s format, from the manual_dir."""

  name = 'hml_coco2014'
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  NUM_LABELS = NUM_LABELS
  HOMEPAGE = 'https://cocodataset.org/'

  def read_splits(self, root):
    """The category names come from the annotation files, which must agree."""
    splits = {split: read_instances(root, split) for split in ('train', 'test')}
    if splits['train'][2] != splits['test'][2]:
      raise errors.InvalidInputError(
          f'{Coco2014.name}: instances_train2014.json and instances_val2014.json in {root} '
          f'list different categories: {splits["train"][2]} vs {splits["test"][2]}')
    return {
        split: (filenames, labels, [name for _, name in categories])
        for split, (filenames, labels, categories) in splits.items()
    }

  def image_path(self, root, filename):
    return os.path.join(root, filename)
