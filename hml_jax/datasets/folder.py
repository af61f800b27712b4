"""Your own images: a folder plus CSV files, no dataset class to write.

  DIR/train.csv   header `filename,labels`; one image per row, the names of its positive labels
                  separated by spaces, or by '|' when names contain spaces ("traffic light|car");
                  an empty field: no positive label; filenames relative to DIR, each listed once
  DIR/test.csv    the same for the test split; without it, config.dataset.test_fraction of
                  train.csv's rows (seeded by config.dataset.test_seed) become the test split
  DIR/...         the images: any format PIL reads (JPEG, PNG, WebP, TIFF, BMP, GIF...) with
                  config.dataset.decoder='pil', JPEG, PNG, GIF or BMP with 'tensorflow'

Label names are the sorted set of names in both files; they are saved with the run
(workdir/dataset.json) so that predictions come back with names. Every image is checked when the
dataset loads (a fast reduced-size decode): a corrupt one is named, or skipped and counted with
config.dataset.skip_corrupt=True.
"""
from concurrent import futures
import csv
import functools
import logging
import os
import re
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image

from hml_jax import decoders
from hml_jax import sources
from hml_jax import splits

TENSORFLOW_FORMATS = ('JPEG', 'PNG', 'GIF', 'BMP')  # what tf.io.decode_image reads
# Characters that mean the labels field holds something else than label names (a Python list,
# another separator); label names may contain spaces only when '|' separates them.
FORBIDDEN_IN_LABELS = re.compile(r'[\[\]\'";,]')


def split_labels(field: str):
  """'cat dog' or 'traffic light|stop sign' -> label names ('|' wins when present)."""
  if '|' in field:
    return [name.strip() for name in field.split('|') if name.strip()]
  return field.split()


def read_csv(path: str) -> Tuple[List[str], List[List[str]]]:
  """(filenames, label lists) of a `filename,labels` CSV, with errors naming file and line."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} does not exist: a folder dataset needs train.csv (and '
                            'optionally test.csv) with the header "filename,labels".')
  with open(path, newline='', encoding='utf-8-sig') as f:  # -sig: a spreadsheet's BOM
    rows = list(csv.reader(f))
  if not rows or [cell.strip().lower() for cell in rows[0]] != ['filename', 'labels']:
    found = rows[0] if rows else 'an empty file'
    raise ValueError(f'{path} line 1 must be the header "filename,labels", found {found}.')
  filenames, labels, seen = [], [], {}
  for line_number, row in enumerate(rows[1:], start=2):
    if not row or not ''.join(row).strip():
      continue
    if len(row) != 2:
      raise ValueError(
          f'{path} line {line_number} has {len(row)} columns ({row}); expected 2, '
          '"filename,labels", with the labels separated by spaces or "|" (not commas: quote the '
          'field or use another separator).')
    filename, label_field = row[0].strip(), row[1].strip()
    if not filename:
      raise ValueError(f'{path} line {line_number} has an empty filename.')
    if FORBIDDEN_IN_LABELS.search(label_field):
      raise ValueError(
          f'{path} line {line_number}: labels field {label_field!r} is not label names '
          'separated by spaces or "|" (no brackets, quotes, commas or semicolons).')
    if filename in seen:
      raise ValueError(f'{path} lists {filename} twice (lines {seen[filename]} and '
                       f'{line_number}).')
    seen[filename] = line_number
    filenames.append(filename)
    labels.append(split_labels(label_field))
  if not filenames:
    raise ValueError(f'{path} has no rows after its header: the split is empty.')
  names = {name for row_labels in labels for name in row_labels}
  if names and names <= {'0', '1'}:
    raise ValueError(f'{path}: every label is "0" or "1", which looks like a 0/1 vector; write '
                     'the names of each image\'s positive labels instead ("cat dog").')
  return filenames, labels


def check_image(path: str, decoder: str) -> Optional[str]:
  """None if the image at path decodes with config.dataset.decoder, else why not. JPEGs decode
  at reduced size (draft), so this costs a fraction of a full decode."""
  try:
    with Image.open(path) as image:
      if decoder == 'tensorflow' and image.format not in TENSORFLOW_FORMATS:
        return (f'format {image.format} is not one of {TENSORFLOW_FORMATS}, which '
                "config.dataset.decoder='tensorflow' reads ('pil' reads it)")
      if decoder == 'pil' or image.format in ('JPEG', 'PNG'):
        image.draft('RGB', (64, 64))
        image.load()
      else:
        # PIL reads BMP and GIF variants (e.g. 1-bit BMPs) that TensorFlow does not: check with
        # the decoder training uses.
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
        with open(path, 'rb') as f:
          tf.io.decode_image(f.read(), channels=3, expand_animations=False)
  except FileNotFoundError:
    return 'file not found'
  except Exception as error:  # pylint: disable=broad-except  (PIL raises many kinds)
    return f'cannot be decoded ({type(error).__name__}: {error})'
  return None


def _check_images(root, filenames, csv_path, skip_corrupt, decoder, parallelism=16):
  paths = [os.path.join(root, name) for name in filenames]
  missing = [(i, p) for i, p in enumerate(paths) if not os.path.isfile(p)]
  if missing:
    shown = ', '.join(p for _, p in missing[:5])
    raise FileNotFoundError(f'{len(missing)} image(s) listed in {csv_path} do not exist: '
                            f'{shown}{" ..." if len(missing) > 5 else ""}')
  with futures.ThreadPoolExecutor(parallelism) as pool:
    problems = list(pool.map(functools.partial(check_image, decoder=decoder), paths))
  bad = [(i, paths[i], problem) for i, problem in enumerate(problems) if problem]
  if bad and not skip_corrupt:
    shown = '; '.join(f'{p}: {problem}' for _, p, problem in bad[:5])
    raise ValueError(f'{len(bad)} corrupt image(s) in {csv_path}: {shown}. Fix or remove them, '
                     'or set config.dataset.skip_corrupt=True to skip them.')
  if bad:
    logging.warning('Skipped %d corrupt image(s) of %s (config.dataset.skip_corrupt): %s', len(bad),
                    csv_path, ', '.join(p for _, p, _ in bad[:10]))
  keep = np.ones(len(paths), bool)
  keep[[i for i, _, _ in bad]] = False
  return keep, len(bad)


def label_matrix(label_lists, label_names) -> np.ndarray:
  column = {name: j for j, name in enumerate(label_names)}
  matrix = np.zeros((len(label_lists), len(label_names)), np.int32)
  for i, names in enumerate(label_lists):
    matrix[i, [column[name] for name in names]] = 1
  return matrix


def read_folder(dataset_config):
  """{'train'/'test': (paths, label lists)}, label names, and the number of skipped images."""
  root = dataset_config.get('path') or ''
  if not root:
    raise ValueError('config.dataset.path is empty: a folder dataset needs the folder holding '
                     'train.csv (--config.dataset.path=DIR).')
  if not os.path.isdir(root):
    raise FileNotFoundError(f'Dataset folder {root} (config.dataset.path) does not exist.')
  skip_corrupt = dataset_config.get('skip_corrupt', False)
  decoder = decoders.image_decoder(dataset_config)
  splits = {}
  train_csv = os.path.join(root, 'train.csv')
  test_csv = os.path.join(root, 'test.csv')
  filenames, labels = read_csv(train_csv)
  if os.path.exists(test_csv):
    splits['train'] = (train_csv, filenames, labels)
    splits['test'] = (test_csv,) + read_csv(test_csv)
    in_both = sorted(set(filenames) & set(splits['test'][1]))
    if in_both:
      raise ValueError(f'{len(in_both)} image(s) are in both {train_csv} and {test_csv} (the '
                       f'test split must be unseen), e.g. {in_both[:3]}.')
  else:
    fraction = dataset_config.get('test_fraction', 0.2)
    permutation = np.random.RandomState(dataset_config.get('test_seed',
                                                           0)).permutation(len(filenames))
    num_test = int(np.round(fraction * len(filenames)))
    if not 0 < num_test < len(filenames):
      raise ValueError(f'{train_csv} has {len(filenames)} rows; a test fraction of {fraction} '
                       '(config.dataset.test_fraction) leaves an empty split. Add test.csv.')
    test_rows, train_rows = np.sort(permutation[:num_test]), np.sort(permutation[num_test:])
    splits['train'] = (train_csv, [filenames[i] for i in train_rows],
                       [labels[i] for i in train_rows])
    splits['test'] = (train_csv + ' (held-out test rows)', [filenames[i] for i in test_rows],
                      [labels[i] for i in test_rows])
  label_names = sorted(
      {name for _, _, lists in splits.values() for names in lists for name in names})
  if not label_names:
    raise ValueError(f'{train_csv}: no image has a label.')
  result, skipped = {}, 0
  for split, (csv_path, names, lists) in splits.items():
    keep, num_bad = _check_images(root, names, csv_path, skip_corrupt, decoder)
    skipped += num_bad
    paths = [os.path.join(root, n) for n, k in zip(names, keep) if k]
    lists = [items for items, kept in zip(lists, keep) if kept]
    if not paths:
      raise ValueError(f'The {split} split of {csv_path} is empty after skipping corrupt images.')
    result[split] = (paths, lists)
  return result, label_names, skipped


def file_reader(name: str, paths):
  """The splits.RecordReader of a list of image files, official index = list position.

  A process opens only the files of its part, a contiguous range of the list
  (splits.part_bounds); a seeded read is an exact permutation of that range, no shuffle
  buffer needed. One process: a permutation of the whole list, as ever."""
  paths = np.asarray(paths)

  def read(shuffle_seed, start, stop):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    order = np.arange(stop - start)
    if shuffle_seed is not None:  # a list of files can be permuted exactly, like in memory
      order = np.random.RandomState(shuffle_seed % 2**32).permutation(stop - start)
    index = start + order
    dataset = tf.data.Dataset.from_tensor_slices({
        'path': paths[index],
        'index': index.astype(np.int64)
    })
    return dataset.map(lambda x: {
        'image': tf.io.read_file(x['path']),
        'index': x['index']
    },
                       num_parallel_calls=tf.data.AUTOTUNE,
                       deterministic=True)

  return splits.RecordReader(name, read, np.arange(len(paths), dtype=np.int64))


def load_source(dataset_config):
  """The sources.Source of a folder dataset (images streamed by tf.data)."""
  splits, label_names, skipped = read_folder(dataset_config)

  if skipped:
    logging.warning('Folder dataset %s: %d corrupt image(s) skipped in all.', dataset_config.path,
                    skipped)
  return sources.Source(name=f'folder {dataset_config.path}',
                        train_labels=label_matrix(splits['train'][1], label_names),
                        test_labels=label_matrix(splits['test'][1], label_names),
                        label_names=label_names,
                        train_records=file_reader(f'folder {dataset_config.path} train',
                                                  splits['train'][0]),
                        test_records=file_reader(f'folder {dataset_config.path} test',
                                                 splits['test'][0]),
                        exact_shuffle=True)
