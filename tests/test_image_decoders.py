"""config.dataset.decoder: 'pil' against torchvision's own output, 'tensorflow' against 'pil', and
both through the streamed pipeline, the folder checks, prediction and resuming."""
import io
import os

import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from hml_jax.data import decoders
from hml_jax.data import splits
from hml_jax.datasets import folder
from hml_jax.tools import predict
from hml_jax.training import input_pipeline
from tests.test_folder_and_features import tiny_image_config
from tests.test_folder_and_features import write_folder

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'torchvision_resize.npz')


def fixture_cases():
  """{case: (encoded bytes, {size: torchvision's (size, size, 3) uint8})}."""
  arrays = np.load(FIXTURE)
  cases = {}
  for key in arrays.files:
    name, what = key.split('/')
    encoded, resized = cases.setdefault(name, (None, {}))
    if what == 'encoded':
      cases[name] = (arrays[key].tobytes(), resized)
    else:
      resized[int(what)] = arrays[key]
  return cases


CASES = fixture_cases()


@pytest.mark.parametrize('name', sorted(CASES))
def test_pil_decoder_is_torchvisions_resize_exactly(name):
  encoded, expected = CASES[name]
  assert sorted(expected) == [16, 30, 48]  # shrink, mixed, enlarge (the images are 35x25)
  for size, torchvision_output in expected.items():
    np.testing.assert_array_equal(decoders.decode_and_resize_with_pil(encoded, size),
                                  torchvision_output)
    # Through the batch function that tf.data's threads call, mirrored or not.
    batch = decoders.decode_batch_with_pil(np.array([encoded, encoded], dtype=object),
                                           np.array([False, True]), np.array([0, 1]), size)
    np.testing.assert_array_equal(batch[0], torchvision_output)
    np.testing.assert_array_equal(batch[1], torchvision_output[:, ::-1])


@pytest.mark.parametrize(
    'name', ['rgb_jpeg', 'gray_jpeg', 'cmyk_jpeg', 'rgb_png', 'rgba_png', 'palette_gif'])
def test_tensorflow_decoder_is_close_to_torchvision(name):
  encoded, expected = CASES[name]
  for size, torchvision_output in expected.items():
    image = decoders.decode_and_resize_with_tensorflow(tf.constant(encoded), size)
    difference = np.abs(image.numpy().astype(int) - torchvision_output.astype(int))
    if name.endswith('jpeg'):
      # TensorFlow's JPEG decoder rounds differently from PIL's (measured: 0.65-1.08 grey levels
      # on average, 5 at most); the resize alone differs by one level at most.
      assert difference.mean() < 1.5 and difference.max() <= 6, (size, difference)
    else:
      assert difference.max() <= 1, (size, difference.max())


def test_sixteen_bit_images_are_scaled_to_eight_bits_as_tensorflow_does():
  """PIL's convert('RGB') would clip a 16-bit PNG at 255 (nearly white)."""
  gradient = np.round(np.linspace(0, 65535, 25 * 35)).astype(np.uint16).reshape(25, 35)
  buffer = io.BytesIO()
  Image.fromarray(gradient).save(buffer, format='PNG')
  encoded = buffer.getvalue()
  assert Image.open(io.BytesIO(encoded)).mode in decoders.SIXTEEN_BIT_MODES
  image = decoders.decode_and_resize_with_pil(encoded, 16)
  reference = decoders.decode_and_resize_with_tensorflow(tf.constant(encoded), 16).numpy()
  assert np.abs(image.astype(int) - reference.astype(int)).max() <= 1
  assert 100 < image.mean() < 155  # a gradient from black to white, not white


def test_grayscale_output_for_one_channel_models():
  encoded, _ = CASES['rgb_jpeg']
  image = decoders.decode_and_resize_with_pil(encoded, 16, channels=1)
  reference = Image.open(io.BytesIO(encoded)).convert('L').resize((16, 16), Image.BILINEAR)
  assert image.shape == (16, 16, 1) and image.dtype == np.uint8
  np.testing.assert_array_equal(image[:, :, 0], np.asarray(reference))


def test_unreadable_bytes_and_unknown_decoder_are_named(tmp_path):
  with pytest.raises(ValueError, match='not a readable image'):
    decoders.decode_and_resize_with_pil(b'\xff\xd8\xff\xe0 not a jpeg', 16)
  encoded, _ = CASES['rgb_jpeg']
  with pytest.raises(ValueError, match='not a readable image'):
    decoders.decode_and_resize_with_pil(encoded[:len(encoded) // 2], 16)  # truncated
  with pytest.raises(ValueError, match=r"config.dataset.decoder='opencv' is not one of"):
    decoders.check_decoder('opencv')
  write_folder(tmp_path)
  config = tiny_image_config(tmp_path)
  config.dataset.decoder = 'PIL'
  with pytest.raises(ValueError, match=r"config.dataset.decoder='PIL'"):
    decoders.image_decoder(config.dataset)
  with pytest.raises(ValueError, match=r"config.dataset.decoder='PIL'"):
    input_pipeline.load(config)


@pytest.mark.parametrize('decoder', ['pil', 'tensorflow'])
def test_an_image_that_breaks_after_loading_stops_the_pipeline_with_its_row(tmp_path, decoder):
  written, _, data = load_folder(tmp_path, decoder)
  (tmp_path / written['test'][5][0]).write_bytes(b'garbage')  # after the load-time check
  expected = (r'Image of row 5 of this split: not a readable image'
              if decoder == 'pil' else 'Unknown image file format')  # TensorFlow's words: no row
  with pytest.raises(tf.errors.InvalidArgumentError, match=expected):
    list(data.test.eval_batches(4))


def test_a_workdir_config_without_the_key_decodes_with_pil():
  """A workdir written before dataset.decoder existed reads as the decoder it ran with."""
  from hml_jax.state import workdir_files  # pylint: disable=g-import-not-at-top
  config = tiny_image_config('/nonexistent')
  assert decoders.image_decoder(config.dataset) == 'pil'  # configs/default.py
  older = config.to_dict()
  del older['dataset']['decoder']
  read = ml_collections.ConfigDict(workdir_files.with_later_keys(older))
  assert decoders.image_decoder(read.dataset) == 'pil'


def load_folder(tmp_path, decoder):
  """(the written {split: [(filename, labels)]}, config, Data) of a small folder dataset."""
  written = write_folder(tmp_path)
  config = tiny_image_config(tmp_path)
  config.dataset.decoder = decoder
  return written, config, input_pipeline.load(config)


def expected_image(path, decoder):
  """What `decoder` should make of the file at path at 32x32: torchvision's pixels for 'pil'."""
  if decoder == 'pil':
    return np.asarray(Image.open(path).convert('RGB').resize((32, 32), Image.BILINEAR))
  with open(path, 'rb') as f:
    return decoders.decode_and_resize_with_tensorflow(tf.constant(f.read()), 32).numpy()


@pytest.mark.parametrize('decoder', ['pil', 'tensorflow'])
def test_eval_batches_hold_the_decoders_images_and_pad_the_last(tmp_path, decoder):
  written, _, data = load_folder(tmp_path, decoder)
  assert data.test.decoder == decoder and data.train.decoder == decoder
  batches = list(data.test.eval_batches(3))  # 8 test images: 3 + 3 + 2, padded to 3
  assert [int(batch['mask'].sum()) for batch in batches] == [3, 3, 2]
  seen = []
  for batch in batches:
    assert batch['images'].shape == (3, 32, 32, 3) and batch['indices'].dtype == np.int32
    for image, row in zip(batch['images'][batch['mask']], batch['indices'][batch['mask']]):
      np.testing.assert_array_equal(
          image, expected_image(os.path.join(tmp_path, written['test'][row][0]), decoder))
      seen.append(int(row))
  assert sorted(seen) == list(range(8))


def test_both_decoders_flip_the_images_that_tensorflows_flip_would():
  seeds = tf.stack([tf.fill([200], tf.constant(7, tf.int64)), tf.range(200, dtype=tf.int64)], 1)
  image = tf.reshape(tf.range(6), (1, 2, 3))
  for seed in seeds:
    flipped = tf.image.stateless_random_flip_left_right(image, seed=seed)
    assert bool(decoders.mirror_decision(seed)) == bool(tf.reduce_any(flipped != image))


@pytest.mark.parametrize('decoder', ['pil', 'tensorflow'])
def test_training_batches_are_the_decoders_images_mirrored_by_the_seeded_rule(tmp_path, decoder):
  written, config, data = load_folder(tmp_path, decoder)
  paths = {}  # train split row -> file
  for index, row in enumerate(data.train.rows_of_index):
    if row >= 0:
      paths[row] = os.path.join(tmp_path, written['train'][index][0])
  shuffle_seed = splits.epoch_seed(0, 3)
  mirrored = 0
  for batch in data.train.train_batches(4, seed=0, epoch=3):
    for image, row in zip(batch['images'], batch['indices']):
      expected = expected_image(paths[row], decoder)
      if bool(decoders.mirror_decision(tf.constant([shuffle_seed, row], tf.int64))):
        expected = expected[:, ::-1]
        mirrored += 1
      np.testing.assert_array_equal(image, expected)
  assert 0 < mirrored < len(data.train)


def test_both_decoders_give_the_same_batches_of_the_same_images(tmp_path):
  _, config, data = load_folder(tmp_path, 'pil')
  config.dataset.decoder = 'tensorflow'
  other = input_pipeline.load(config)
  for split, other_split in ((data.train, other.train), (data.test, other.test)):
    if split is data.train:
      batches = list(split.train_batches(4, seed=0, epoch=2, start_step=1))
      other_batches = list(other_split.train_batches(4, seed=0, epoch=2, start_step=1))
    else:
      batches, other_batches = list(split.eval_batches(3)), list(other_split.eval_batches(3))
    assert len(batches) == len(other_batches) > 1
    for batch, other_batch in zip(batches, other_batches):
      assert set(batch) == set(other_batch)
      for key in batch:
        if key != 'images':
          np.testing.assert_array_equal(batch[key], other_batch[key])
      difference = np.abs(batch['images'].astype(int) - other_batch['images'].astype(int))
      assert difference.mean() < 2  # the same images, flipped alike: JPEG rounding only


def test_folder_accepts_what_the_decoder_reads(tmp_path):
  write_folder(tmp_path)
  rows = (tmp_path / 'train.csv').read_text().split('\n')
  encoded, _ = CASES['one_bit_bmp']
  (tmp_path / 'images' / 'train_1.bmp').write_bytes(encoded)
  encoded, _ = CASES['rgb_webp']
  (tmp_path / 'images' / 'train_2.webp').write_bytes(encoded)
  rows[2] = 'images/train_1.bmp,cat'
  rows[3] = 'images/train_2.webp,dog'
  (tmp_path / 'train.csv').write_text('\n'.join(rows))
  config = tiny_image_config(tmp_path)
  data = input_pipeline.load(config)  # 'pil' reads both
  assert len(data.train) + len(data.validation) == 24
  assert folder.check_image(str(tmp_path / 'images' / 'train_1.bmp'), 'pil') is None
  # TensorFlow's decoder reads neither: both are named when the data loads.
  assert 'cannot be decoded' in folder.check_image(str(tmp_path / 'images' / 'train_1.bmp'),
                                                   'tensorflow')
  assert "format WEBP is not one of" in folder.check_image(
      str(tmp_path / 'images' / 'train_2.webp'), 'tensorflow')
  config.dataset.decoder = 'tensorflow'
  with pytest.raises(ValueError, match='train_1.bmp.*train_2.webp'):
    input_pipeline.load(config)


def test_prediction_prepares_images_with_the_runs_decoder(tmp_path):
  encoded, expected = CASES['cmyk_jpeg']
  path = tmp_path / 'cmyk.jpg'
  path.write_bytes(encoded)
  image, error = predict.load_image(str(path), 30, 3, 'pil')
  assert error is None
  np.testing.assert_array_equal(image, expected[30])
  image, error = predict.load_image(str(path), 30, 3, 'tensorflow')
  assert error is None and image.shape == (30, 30, 3)
  (tmp_path / 'bad.jpg').write_bytes(b'garbage')
  for decoder in decoders.DECODERS:
    image, error = predict.load_image(str(tmp_path / 'bad.jpg'), 30, 3, decoder)
    assert image is None and error.startswith('not a readable image'), error
