"""Throughput of the image input pipeline on this host, in images per second.

  python benchmarks/benchmark_input_pipeline.py [--num_images=512] [--image_size=448[,224...]]
      [--batch_size=16[,64...]] [--epochs=1] [--parallel_calls=1,2,-1]
      [--decoder=pil,tensorflow]

Writes --num_images synthetic photos (500x375 JPEGs, quality 90: the typical VOC image) as a
folder dataset in a temporary directory, then times --epochs training epochs of
splits.ImageSplit (read, decode, resize to --image_size with antialiasing, random flip,
batch) for several values of config.dataset.parallel_calls and config.dataset.decoder, after one
warm-up epoch. The variant
"+ normalize on host" adds the float32 normalization that our pipeline leaves to the accelerator,
to show what moving it to the host would cost. Numbers are side by side from one run.
"""
import argparse
import os
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # pylint: disable=g-import-not-at-top

from hml_jax.data import decoders  # pylint: disable=g-import-not-at-top
from hml_jax.training import input_pipeline  # pylint: disable=g-import-not-at-top
from hml_jax.tools.benchmark import epoch_images_per_sec
from hml_jax.tools.benchmark import image_and_batch_sizes
from hml_jax.tools.benchmark import MIN_PHOTOS
from hml_jax.tools.benchmark import photo_folder_config
from hml_jax.tools.benchmark import write_photos

IMAGENET_MEAN = np.array((0.485, 0.456, 0.406), np.float32)
IMAGENET_STD = np.array((0.229, 0.224, 0.225), np.float32)


def normalized_on_host(images):
  """What our pipeline leaves to the accelerator: uint8 -> float32, ImageNet mean and std."""
  return (images.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--num_images', type=int, default=512)
  parser.add_argument('--image_size',
                      default='448',
                      help='comma-separated sizes, each timed on the same photos')
  parser.add_argument('--batch_size',
                      default='16',
                      help='one batch size, or one per --image_size (comma-separated)')
  parser.add_argument('--epochs',
                      type=int,
                      default=1,
                      help='timed epochs per value (their images/s together); more for a host '
                      'whose cores finish an epoch in well under a second')
  parser.add_argument('--parallel_calls',
                      default='1,2,-1',
                      help='config.dataset.parallel_calls values; -1 = AUTOTUNE')
  parser.add_argument('--decoder',
                      default=','.join(decoders.DECODERS),
                      help='config.dataset.decoder values (decoders.DECODERS)')
  args = parser.parse_args()
  try:
    sizes = image_and_batch_sizes(args.image_size, args.batch_size)
  except ValueError as error:
    parser.error(str(error))
  if args.num_images < MIN_PHOTOS:
    parser.error(f'--num_images={args.num_images}: at least {MIN_PHOTOS} (one test, one '
                 'validation and one training photo)')
  timed = list(range(2, 2 + 2 * args.epochs))  # epoch 1 warms up
  with tempfile.TemporaryDirectory() as root:
    write_photos(root, args.num_images)  # once: writing 1,024 photos takes about 20 s
    for image_size, batch_size in sizes:
      print(f'{os.cpu_count()} CPU cores; {args.num_images} JPEGs of 500x375 -> '
            f'{image_size}x{image_size}, batch {batch_size}')
      print('| decoder | parallel_calls | images/s (uint8 out, as trained) | + normalize on host |')
      print('|---|---|---|---|')
      for decoder in args.decoder.split(','):
        for parallel_calls in [int(p) for p in args.parallel_calls.split(',')]:
          split = input_pipeline.load(
              photo_folder_config(root, args.num_images, image_size, decoder, parallel_calls)).train
          epoch_images_per_sec(split, batch_size, [1])  # warm-up: tf.data graph, file cache
          plain = epoch_images_per_sec(split, batch_size, timed[:args.epochs])
          normalized = epoch_images_per_sec(split,
                                            batch_size,
                                            timed[args.epochs:],
                                            transform=normalized_on_host)
          label = 'AUTOTUNE' if parallel_calls == -1 else parallel_calls
          print(f'| {decoder} | {label} | {plain:.0f} | {normalized:.0f} |', flush=True)


if __name__ == '__main__':
  main()
