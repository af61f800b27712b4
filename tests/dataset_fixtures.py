"""Tiny copies of the paper's four datasets in their real on-disk formats, for the builder tests.

Each write_* function writes a handful of small random JPEGs (different sizes, at least one
grayscale) and the label files of its dataset under a directory, from a seeded NumPy RNG, and
returns what it wrote: the image ids or paths per split, and the special cases it planted.
"""
import json
import os

import numpy as np
from PIL import Image

VOC_CLASSES = ('aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair',
               'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep',
               'sofa', 'train', 'tvmonitor')
# The official COCO category ids: 1..90 without these ten.
COCO_CATEGORY_IDS = tuple(
    i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))


def write_jpeg(path, rng, mode='RGB'):
  """A random JPEG of a random small size; mode 'RGB', 'L' (grayscale) or 'CMYK'."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  height, width = rng.randint(8, 40, 2)
  pixels = rng.randint(0, 256, (height, width, 3)).astype(np.uint8)
  Image.fromarray(pixels).convert(mode).save(path, 'JPEG')


def _write_lines(path, lines):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.writelines(line + '\n' for line in lines)


def write_voc2012(root, seed=0):
  """VOCdevkit/VOC2012/{JPEGImages,ImageSets/Main} with 7 train and 5 val images.

  Each `<class>_<split>.txt` lists every image of the split (in a scrambled, not sorted order) as
  `<id> <-1|0|1>` with VOC's `%s %2d` layout. 'dropped' images have only 0 (difficult) and -1
  entries, so Cole et al.'s procedure must drop them. One image is grayscale; one JPEG is in no
  split."""
  rng = np.random.RandomState(seed)
  voc = os.path.join(root, 'VOCdevkit', 'VOC2012')
  ids = {
      'train': [
          '2008_000010', '2008_000002', '2009_000001', '2008_000007', '2010_000005', '2008_000003',
          '2011_000100'
      ],
      'val': ['2008_000009', '2012_000001', '2008_000004', '2010_000011', '2009_000020']
  }
  dropped = {'train': ['2008_000007'], 'val': ['2010_000011']}
  grayscale = '2009_000001'
  for split_ids in ids.values():
    for image_id in split_ids:
      write_jpeg(os.path.join(voc, 'JPEGImages', image_id + '.jpg'), rng,
                 'L' if image_id == grayscale else 'RGB')
  write_jpeg(os.path.join(voc, 'JPEGImages', '2007_000027.jpg'), rng)  # in no split
  values = {}
  for split, split_ids in ids.items():
    table = rng.choice([-1, 0, 1], size=(len(split_ids), len(VOC_CLASSES)), p=[0.7, 0.1, 0.2])
    for row, image_id in enumerate(split_ids):
      if image_id in dropped[split]:
        table[row] = -1
        table[row, rng.choice(len(VOC_CLASSES), 3, replace=False)] = 0
      elif not np.any(table[row] == 1):
        table[row, rng.randint(len(VOC_CLASSES))] = 1
    values[split] = table
    for column, name in enumerate(VOC_CLASSES):
      _write_lines(
          os.path.join(voc, 'ImageSets', 'Main', f'{name}_{split}.txt'),
          ['%s %2d' % (image_id, table[row, column]) for row, image_id in enumerate(split_ids)])
  return {'ids': ids, 'values': values, 'dropped': dropped, 'grayscale': grayscale + '.jpg'}


def write_coco2014(root, seed=0):
  """annotations/instances_{train,val}2014.json and {train,val}2014/COCO_*.jpg.

  80 categories with the official non-contiguous ids; image ids whose string order differs from
  their numeric order (9, 10, 100, ...); one image per split without annotations (to be dropped);
  crowd annotations; one grayscale and one CMYK JPEG."""
  rng = np.random.RandomState(seed)
  image_ids = {'train': [9, 10, 100, 25, 3, 42], 'val': [1, 11, 2, 20, 300]}
  unannotated = {'train': [42], 'val': [20]}
  grayscale, cmyk = ('train', 10), ('val', 2)
  categories = [{
      'supercategory': 'thing',
      'id': i,
      'name': f'category {i}'
  } for i in COCO_CATEGORY_IDS]
  annotation_id = 1
  for split, ids in image_ids.items():
    images, annotations = [], []
    for image_id in ids:
      file_name = f'COCO_{split}2014_{image_id:012d}.jpg'
      mode = 'L' if (split, image_id) == grayscale else 'CMYK' if (split, image_id) == cmyk \
          else 'RGB'
      write_jpeg(os.path.join(root, f'{split}2014', file_name), rng, mode)
      images.append({'license': 1, 'file_name': file_name, 'height': 0, 'width': 0, 'id': image_id})
      if image_id in unannotated[split]:
        continue
      for _ in range(rng.randint(1, 5)):
        annotations.append({
            'segmentation': [],
            'area': 1.0,
            'iscrowd': int(rng.rand() < 0.2),
            'image_id': image_id,
            'bbox': [0, 0, 1, 1],
            'category_id': int(rng.choice(COCO_CATEGORY_IDS)),
            'id': annotation_id
        })
        annotation_id += 1
    annotations = [annotations[i] for i in rng.permutation(len(annotations))]
    os.makedirs(os.path.join(root, 'annotations'), exist_ok=True)
    with open(os.path.join(root, 'annotations', f'instances_{split}2014.json'), 'w') as f:
      json.dump(
          {
              'info': {},
              'images': images,
              'licenses': [],
              'annotations': annotations,
              'categories': categories
          }, f)
  return {
      'image_ids': image_ids,
      'unannotated': unannotated,
      'grayscale': 'train2014/COCO_train2014_000000000010.jpg',
      'cmyk': 'val2014/COCO_val2014_000000000002.jpg'
  }


def write_cub(root, seed=0, attributes_in_tgz_place=False):
  """CUB_200_2011/{images.txt,train_test_split.txt,attributes/image_attribute_labels.txt,images/}
  with 8 images and attributes.txt (312 names) at the root, where Cole et al. read it, or under
  CUB_200_2011/attributes/. One line of image_attribute_labels.txt carries an extra field, as a
  few lines of the real file do. One image is grayscale."""
  rng = np.random.RandomState(seed)
  base = os.path.join(root, 'CUB_200_2011')
  paths = [
      '001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg',
      '001.Black_footed_Albatross/Black_Footed_Albatross_0009_34.jpg',
      '002.Laysan_Albatross/Laysan_Albatross_0002_1027.jpg',
      '002.Laysan_Albatross/Laysan_Albatross_0082_524.jpg',
      '014.Indigo_Bunting/Indigo_Bunting_0063_11820.jpg',
      '014.Indigo_Bunting/Indigo_Bunting_0010_13000.jpg',
      '200.Common_Yellowthroat/Common_Yellowthroat_0055_190967.jpg',
      '200.Common_Yellowthroat/Common_Yellowthroat_0114_190501.jpg'
  ]
  is_train = [1, 0, 1, 1, 0, 0, 1, 0]
  grayscale = paths[4]
  for path in paths:
    write_jpeg(os.path.join(base, 'images', path), rng, 'L' if path == grayscale else 'RGB')
  _write_lines(os.path.join(base, 'images.txt'),
               [f'{i + 1} {path}' for i, path in enumerate(paths)])
  _write_lines(os.path.join(base, 'train_test_split.txt'),
               [f'{i + 1} {t}' for i, t in enumerate(is_train)])
  names = [f'has_part_{i // 8}::value_{i % 8}' for i in range(312)]
  names_path = (os.path.join(base, 'attributes', 'attributes.txt')
                if attributes_in_tgz_place else os.path.join(root, 'attributes.txt'))
  _write_lines(names_path, [f'{i + 1} {name}' for i, name in enumerate(names)])
  present = (rng.rand(len(paths), 312) < 0.1).astype(int)
  lines = []
  for image in range(len(paths)):
    for attribute in range(312):
      lines.append(f'{image + 1} {attribute + 1} {present[image, attribute]} '
                   f'{rng.randint(1, 5)} {rng.uniform(0, 30):.4f}')
  extra_field_line = 3 * 312 + 7  # 0-based
  fields = lines[extra_field_line].split()
  lines[extra_field_line] = ' '.join(fields[:4] + ['0'] + fields[4:])
  _write_lines(os.path.join(base, 'attributes', 'image_attribute_labels.txt'), lines)
  return {
      'paths': paths,
      'is_train': is_train,
      'present': present,
      'names': names,
      'grayscale': grayscale,
      'extra_field_line_number': extra_field_line + 1
  }


def write_nus_wide(root, seed=0, layout='formatted'):
  """NUS-WIDE in Cole et al.'s layout ('formatted': formatted_{train,val}_{images,labels}.npy,
  Concepts81.txt and Flickr/) or the official one ('official': ImageList/, Groundtruth/,
  Concepts81.txt and Flickr/).

  formatted: paths relative to Flickr/ except one train path relative to the root itself; float
  0/1 labels. official: backslash paths; one listed image missing from Flickr/ and one without
  positives, both to be dropped. One image is grayscale in both."""
  rng = np.random.RandomState(seed)
  concepts = [f'concept{i:02d}' for i in range(81)]
  _write_lines(os.path.join(root, 'Concepts81.txt'), concepts)
  folders = ['actor', 'airport', 'zebra']
  paths = {
      split: [f'{folders[rng.randint(3)]}/{i:04d}_{rng.randint(10**9)}.jpg' for i in range(count)]
      for split, count in (('train', 6), ('test', 5))
  }
  labels = {split: (rng.rand(len(p), 81) < 0.08).astype(np.float64) for split, p in paths.items()}
  for split_labels in labels.values():
    split_labels[~split_labels.any(1), 0] = 1
  grayscale = paths['train'][1]
  written = {'concepts': concepts, 'paths': paths, 'labels': labels, 'grayscale': grayscale}
  if layout == 'formatted':
    paths['train'][3] = 'extra/' + paths['train'][3].split('/')[1]  # relative to the root
    for split, name in (('train', 'train'), ('test', 'val')):
      for path in paths[split]:
        where = root if path.startswith('extra/') else os.path.join(root, 'Flickr')
        write_jpeg(os.path.join(where, path), rng, 'L' if path == grayscale else 'RGB')
      np.save(os.path.join(root, f'formatted_{name}_images.npy'), np.array(paths[split]))
      np.save(os.path.join(root, f'formatted_{name}_labels.npy'), labels[split])
    return written
  missing = {'train': [paths['train'][2]], 'test': [paths['test'][0]]}
  no_positive = {'train': [paths['train'][4]], 'test': [paths['test'][3]]}
  for split, official in (('train', 'Train'), ('test', 'Test')):
    row = paths[split].index(no_positive[split][0])
    labels[split][row] = 0
    for path in paths[split]:
      if path not in missing[split]:
        write_jpeg(os.path.join(root, 'Flickr', path), rng, 'L' if path == grayscale else 'RGB')
    _write_lines(os.path.join(root, 'ImageList', f'{official}Imagelist.txt'),
                 [p.replace('/', '\\') for p in paths[split]])
    for column, concept in enumerate(concepts):
      _write_lines(
          os.path.join(root, 'Groundtruth', 'TrainTestLabels', f'Labels_{concept}_{official}.txt'),
          [str(int(v)) for v in labels[split][:, column]])
  written.update(missing=missing, no_positive=no_positive)
  return written
