"""Your own images: a folder plus CSV files, no dataset class to write.

  DIR/train.csv   header `filename,labels`; one image per row, the names of its positive labels
                  separated by spaces, or by '|' when names contain spaces ("traffic light|car");
                  an empty field: no positive label; filenames relative to DIR, each image listed
                  once (rows are compared as the files they name: 'img/0.png' and './img/0.png'
                  are one image, in one CSV or across train and test); a filename that leaves DIR
                  ('../x.png', '/abs/x.png') is an error unless config.dataset.allow_outside_paths
                  (symbolic links inside DIR are inside)
  DIR/test.csv    the same for the test split; without it, config.dataset.test_fraction of
                  train.csv's rows (seeded by config.dataset.test_seed) become the test split
  DIR/...         the images: any format PIL reads (JPEG, PNG, WebP, TIFF, BMP, GIF...) with
                  config.dataset.decoder='pil', JPEG, PNG, GIF or BMP with 'tensorflow'

Label names are the sorted set of names in both files; they are saved with the run
(workdir/dataset.json) so that predictions come back with names. Every image is checked when the
dataset loads (a fast reduced-size decode): a corrupt one, or one whose header declares more than
config.dataset.max_image_pixels pixels, is named, or skipped and counted with
config.dataset.skip_corrupt=True. The CSV files are UTF-8.
"""
from concurrent import futures
import csv
import functools
import io
import logging
import os
import re
from typing import List, Optional, Tuple

import numpy as np

from hml_jax.data import decoders
from hml_jax.data import sources
from hml_jax.data import splits
from hml_jax.runtime import errors

TENSORFLOW_FORMATS = ('JPEG', 'PNG', 'GIF', 'BMP')  # what tf.io.decode_image reads
# Characters that mean the labels field holds something else than label names (a Python list,
# another separator); label names may contain spaces only when '|' separates them.
FORBIDDEN_IN_LABELS = re.compile(r'[\[\]\'";,]')


def split_labels(field: str):
  """'cat dog' or 'traffic light|stop sign' -> label names ('|' wins when present)."""
  if '|' in field:
    return [name.strip() for name in field.split('|') if name.strip()]
  return field.split()


def _decode(path: str, data: bytes) -> str:
  """The text of a CSV file (UTF-8, a spreadsheet's BOM dropped); an error naming the line of the
  first byte that is not UTF-8."""
  try:
    return data.decode('utf-8-sig')
  except UnicodeDecodeError as error:
    line_number = data[:error.start].count(b'\n') + 1
    column = error.start - (data.rfind(b'\n', 0, error.start) + 1) + 1
    raise errors.InvalidInputError(
        f'{path} line {line_number} is not UTF-8 (byte 0x{data[error.start]:02x} at column '
        f'{column}): save the CSV as UTF-8 (a spreadsheet\'s "CSV UTF-8", or '
        f'iconv -f latin1 -t utf-8).') from None


def _read_rows(path: str) -> List[Tuple[int, str, List[str]]]:
  """(line number, filename, label names) of each row of a `filename,labels` CSV, with errors
  naming the file and line."""
  if not os.path.isfile(path):
    raise errors.MissingInputError(
        f'{path} does not exist: a folder dataset needs train.csv (and optionally test.csv) with '
        'the header "filename,labels".')
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as error:
    raise errors.InvalidInputError(f'Cannot read {path}: {error}') from None
  reader = csv.reader(io.StringIO(_decode(path, data), newline=''))
  try:
    rows = [(reader.line_num, row) for row in reader]
  except csv.Error as error:
    raise errors.InvalidInputError(f'{path} line {reader.line_num + 1} is not valid CSV '
                                   f'({error}).') from None
  if not rows or [cell.strip().lower() for cell in rows[0][1]] != ['filename', 'labels']:
    found = rows[0][1] if rows else 'an empty file'
    raise errors.InvalidInputError(
        f'{path} line 1 must be the header "filename,labels", found {found}.')
  parsed = []
  for line_number, row in rows[1:]:
    if not row or not ''.join(row).strip():
      continue
    if len(row) != 2:
      raise errors.InvalidInputError(
          f'{path} line {line_number} has {len(row)} columns ({row}); expected 2, '
          '"filename,labels", with the labels separated by spaces or "|" (not commas: quote the '
          'field or use another separator).')
    filename, label_field = row[0].strip(), row[1].strip()
    if not filename or '\0' in filename:
      raise errors.InvalidInputError(
          f'{path} line {line_number} has {"a NUL character in its" if filename else "an empty"} '
          'filename.')
    if FORBIDDEN_IN_LABELS.search(label_field):
      raise errors.InvalidInputError(
          f'{path} line {line_number}: labels field {label_field!r} is not label names '
          'separated by spaces or "|" (no brackets, quotes, commas or semicolons).')
    parsed.append((line_number, filename, split_labels(label_field)))
  if not parsed:
    raise errors.InvalidInputError(f'{path} has no rows after its header: the split is empty.')
  names = {name for _, _, row_labels in parsed for name in row_labels}
  if names and names <= {'0', '1'}:
    raise errors.InvalidInputError(
        f'{path}: every label is "0" or "1", which looks like a 0/1 vector; write the names of '
        'each image\'s positive labels instead ("cat dog").')
  return parsed


def real_path(root: str, filename: str) -> str:
  """The file a CSV filename names (symbolic links and '.', '..' resolved): what tells two rows
  apart, so that 'img/0.png' and './img/0.png' are one image."""
  return os.path.realpath(os.path.join(root, filename))


def _check_distinct(path: str, root: str, rows) -> List[str]:
  """The real paths of rows; an error naming both lines if two rows name the same file."""
  seen, real = {}, []
  for line_number, filename, _ in rows:
    target = real_path(root, filename)
    if target in seen:
      first_line, first_name = seen[target]
      same = '' if first_name == filename else f' (as {first_name} and {filename}: one file, {target})'
      raise errors.InvalidInputError(f'{path} lists {filename} twice (lines {first_line} and '
                                     f'{line_number}){same}; list each image once.')
    seen[target] = (line_number, filename)
    real.append(target)
  return real


def check_inside(path: str, root: str, rows) -> None:
  """An error naming the line of the first filename that leaves the folder root ('../x.png',
  '/abs/x.png'). Compared on the normalized path, not the real one: a root that is itself a
  symbolic link, and symbolic links to images inside it, are inside."""
  base = os.path.normpath(os.path.abspath(root))
  for line_number, filename, _ in rows:
    target = os.path.normpath(os.path.join(base, filename))
    if os.path.commonpath([base, target]) != base or target == base:
      raise errors.InvalidInputError(
          f'{path} line {line_number}: {filename} is outside the dataset folder {root} (it '
          f'names {target}); filenames are relative to the folder. Move the image into it, or '
          'set --config.dataset.allow_outside_paths=True to read images outside it.')


def read_csv(path: str) -> Tuple[List[str], List[List[str]]]:
  """(filenames, label lists) of a `filename,labels` CSV, with errors naming file and line; two
  rows naming the same file (compared as real paths, relative to the CSV's folder) are an
  error."""
  rows = _read_rows(path)
  _check_distinct(path, os.path.dirname(path), rows)
  return [filename for _, filename, _ in rows], [labels for _, _, labels in rows]


def check_image(path: str,
                decoder: str,
                max_pixels: int = decoders.DEFAULT_MAX_IMAGE_PIXELS) -> Optional[str]:
  """None if the image at path decodes with config.dataset.decoder, else why not. JPEGs decode
  at reduced size (draft), so this costs a fraction of a full decode; an image declaring more
  than max_pixels pixels is refused from its header, before any decoding."""
  try:
    with decoders.open_image(path, max_pixels) as image:
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
  except decoders.ImageTooLargeError as error:
    return error.problem
  except FileNotFoundError:
    return 'file not found'
  except Exception as error:  # pylint: disable=broad-except  (PIL raises many kinds)
    return f'cannot be decoded ({type(error).__name__}: {error})'
  return None


def _check_images(root, filenames, csv_path, skip_corrupt, decoder, max_pixels, parallelism=16):
  paths = [os.path.join(root, name) for name in filenames]
  missing = [(i, p) for i, p in enumerate(paths) if not os.path.isfile(p)]
  if missing:
    shown = ', '.join(p for _, p in missing[:5])
    raise errors.MissingInputError(f'{len(missing)} image(s) listed in {csv_path} do not exist: '
                                   f'{shown}{" ..." if len(missing) > 5 else ""}')
  check = functools.partial(check_image, decoder=decoder, max_pixels=max_pixels)
  with futures.ThreadPoolExecutor(parallelism) as pool:
    problems = list(pool.map(check, paths))
  bad = [(i, paths[i], problem) for i, problem in enumerate(problems) if problem]
  if bad and not skip_corrupt:
    shown = '; '.join(f'{p}: {problem}' for _, p, problem in bad[:5])
    raise errors.InvalidInputError(
        f'{len(bad)} corrupt image(s) in {csv_path}: {shown}. Fix or remove them, or set '
        'config.dataset.skip_corrupt=True to skip them.')
  if bad:
    logging.warning('Skipped %d corrupt image(s) of %s (config.dataset.skip_corrupt): %s', len(bad),
                    csv_path, ', '.join(p for _, p, _ in bad[:10]))
  keep = np.ones(len(paths), bool)
  keep[[i for i, _, _ in bad]] = False
  return keep, len(bad)


def _check_disjoint(train_csv, train_rows, train_real, test_csv, test_rows, test_real) -> None:
  """An error naming the lines if an image of test.csv is also in train.csv (as real paths:
  'img/0.png' and './img/0.png' are one image)."""
  train_lines = dict(zip(train_real, train_rows))
  in_both = [(train_lines[real], row, real)
             for real, row in zip(test_real, test_rows)
             if real in train_lines]
  if in_both:
    shown = '; '.join(f'{train_row[1]} (line {train_row[0]}) and {test_row[1]} (line '
                      f'{test_row[0]}), both {real}' for train_row, test_row, real in in_both[:3])
    raise errors.InvalidInputError(
        f'{len(in_both)} image(s) are in both {train_csv} and {test_csv} (the test split must be '
        f'unseen), e.g. {shown}. Remove them from one of the two.')


def label_matrix(label_lists, label_names) -> np.ndarray:
  column = {name: j for j, name in enumerate(label_names)}
  matrix = np.zeros((len(label_lists), len(label_names)), np.int32)
  for i, names in enumerate(label_lists):
    matrix[i, [column[name] for name in names]] = 1
  return matrix


def read_folder(dataset_config):
  """{'train'/'test': (paths, label lists)}, label names, and the number of skipped images."""
  root = dataset_config.path
  if not root:
    raise errors.InvalidInputError(
        'config.dataset.path is empty: a folder dataset needs the folder holding train.csv '
        '(--config.dataset.path=DIR).')
  if not os.path.isdir(root):
    raise errors.MissingInputError(f'Dataset folder {root} (config.dataset.path) does not exist.')
  skip_corrupt = dataset_config.skip_corrupt
  allow_outside = dataset_config.allow_outside_paths
  decoder = decoders.image_decoder(dataset_config)
  max_pixels = decoders.max_image_pixels(dataset_config)
  splits = {}
  train_csv = os.path.join(root, 'train.csv')
  test_csv = os.path.join(root, 'test.csv')
  csv_rows = {'train': _read_rows(train_csv)}
  if os.path.exists(test_csv):
    csv_rows['test'] = _read_rows(test_csv)
  real = {}
  for split, rows in csv_rows.items():
    csv_path = train_csv if split == 'train' else test_csv
    if not allow_outside:
      check_inside(csv_path, root, rows)
    real[split] = _check_distinct(csv_path, root, rows)
  filenames = [filename for _, filename, _ in csv_rows['train']]
  labels = [row_labels for _, _, row_labels in csv_rows['train']]
  if 'test' in csv_rows:
    splits['train'] = (train_csv, filenames, labels)
    splits['test'] = (test_csv, [f for _, f, _ in csv_rows['test']],
                      [row_labels for _, _, row_labels in csv_rows['test']])
    _check_disjoint(train_csv, csv_rows['train'], real['train'], test_csv, csv_rows['test'],
                    real['test'])
  else:
    fraction = dataset_config.test_fraction
    permutation = np.random.RandomState(dataset_config.test_seed).permutation(len(filenames))
    num_test = int(np.round(fraction * len(filenames)))
    if not 0 < num_test < len(filenames):
      raise errors.InvalidInputError(
          f'{train_csv} has {len(filenames)} rows; a test fraction of {fraction} '
          '(config.dataset.test_fraction) leaves an empty split. Add test.csv.')
    test_rows, train_rows = np.sort(permutation[:num_test]), np.sort(permutation[num_test:])
    splits['train'] = (train_csv, [filenames[i] for i in train_rows],
                       [labels[i] for i in train_rows])
    splits['test'] = (train_csv + ' (held-out test rows)', [filenames[i] for i in test_rows],
                      [labels[i] for i in test_rows])
  label_names = sorted(
      {name for _, _, lists in splits.values() for names in lists for name in names})
  if not label_names:
    raise errors.InvalidInputError(f'{train_csv}: no image has a label.')
  result, skipped = {}, 0
  for split, (csv_path, names, lists) in splits.items():
    keep, num_bad = _check_images(root, names, csv_path, skip_corrupt, decoder, max_pixels)
    skipped += num_bad
    paths = [os.path.join(root, n) for n, k in zip(names, keep) if k]
    lists = [items for items, kept in zip(lists, keep) if kept]
    if not paths:
      raise errors.InvalidInputError(
          f'The {split} split of {csv_path} is empty after skipping corrupt images.')
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
