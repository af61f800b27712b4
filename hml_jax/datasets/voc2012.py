"""PASCAL VOC 2012 as Cole et al. format it ("Multi-label learning from single positive labels",
CVPR 2021; the paper's VOC): 20 labels, official train as 'train', official val as 'test'.

Cole et al.'s procedure (their preproc/format_pascal.py), reproduced exactly by `read_split`:
for each of the 20 classes in alphabetical order, read
`VOCdevkit/VOC2012/ImageSets/Main/<class>_<official split>.txt`; an image is positive for the class
iff the line's last field is 1 (0 = "difficult" and -1 both count as negative); keep only images
with at least one positive, sorted by file name (`<id>.jpg`). The paper reports 5,717 train /
5,823 test images and 1.44 positives per image.
"""
import os
from typing import List, Tuple

import numpy as np

from hml_jax.datasets import common

NUM_LABELS = 20
LABEL_NAMES = ('aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair',
               'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep',
               'sofa', 'train', 'tvmonitor')
OFFICIAL_SPLITS = {'train': 'train', 'test': 'val'}

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download VOCtrainval_11-May-2012.tar from http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ and
extract it in the manual_dir (by default <data_dir>/downloads/manual):
  tar -xf VOCtrainval_11-May-2012.tar -C <manual_dir>
so that these exist:
  <manual_dir>/VOCdevkit/VOC2012/JPEGImages/<id>.jpg
  <manual_dir>/VOCdevkit/VOC2012/ImageSets/Main/<class>_train.txt and <class>_val.txt
"""

# VOC 2012.


def read_split(root, split: str) -> Tuple[List[str], np.ndarray, List[str]]:
  """(filenames, labels (n, 20) uint8, label_names) of 'train' (official train) or 'test'
  (official val), in Cole et al.'s row order. Filenames are `<id>.jpg`, relative to
  VOCdevkit/VOC2012/JPEGImages (as Cole et al. store them). Reads only the ImageSets/Main lists."""
  common.check_split(split)
  main = os.path.join(os.fspath(root), 'VOCdevkit', 'VOC2012', 'ImageSets', 'Main')
  positives = {}  # filename -> label indices
  for label_index, name in enumerate(LABEL_NAMES):
    path = common.require_path(os.path.join(main, f'{name}_{OFFICIAL_SPLITS[split]}.txt'),
                               Voc2012.name, MANUAL_DOWNLOAD_INSTRUCTIONS)
    with open(path) as f:
      for line_number, line in enumerate(f, 1):
        fields = line.split()
        if not fields:
          continue
        if len(fields) != 2 or fields[1] not in ('-1', '0', '1'):
          raise common.line_error(path, line_number, line, '"<image id> <-1, 0 or 1>"')
        if fields[1] == '1':
          positives.setdefault(fields[0] + '.jpg', set()).add(label_index)
  filenames = sorted(positives)
  labels = np.zeros((len(filenames), NUM_LABELS), np.uint8)
  for row, filename in enumerate(filenames):
    labels[row, sorted(positives[filename])] = 1
  return filenames, labels, list(LABEL_NAMES)


class Voc2012(common.PaperDatasetBuilder):
  """PASCAL VOC 2012 classification labels in Cole et al.'s format, from the manual_dir."""

  name = 'hml_voc2012'
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  NUM_LABELS, LABEL_NAMES = NUM_LABELS, tuple(LABEL_NAMES)
  HOMEPAGE = 'http://host.robots.ox.ac.uk/pascal/VOC/voc2012/'

  def read_splits(self, root):
    return {split: read_split(root, split) for split in ('train', 'test')}

  def image_path(self, root, filename):
    return os.path.join(root, 'VOCdevkit', 'VOC2012', 'JPEGImages', filename)
