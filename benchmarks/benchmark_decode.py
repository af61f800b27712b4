"""Images/s of the 'pil' decoder's stage alone, on 1..N threads of this host; no TensorFlow.

  python benchmarks/benchmark_decode.py [--image_size=224,448] [--batch_size=64,16]
      [--num_images=1024] [--threads=1,2,4,8,16] [--epochs=2]

The streamed pipeline's costly stage is decoding and resizing (docs/datasets.md "The input pipeline"):
with config.dataset.decoder='pil', tf.data's threads each run decoders.decode_batch_with_pil
on a batch of encoded images. This runs that same function on a thread pool, over --num_images
synthetic photos (500x375 JPEGs, quality 90) held in memory, half of them mirrored, and prints
images/s per thread count next to the ideal (the first row's rate per thread, times
min(threads, cores); the first row is one thread unless --threads says otherwise): where
the two part, the GIL (which PIL releases only while it decodes and resizes) or the cores bound
the stage. Last, the time per image that the stage spends in Python, holding the GIL (the same
calls on an 8x8 JPEG, and the copy of the result out of PIL): its inverse bounds what one process
can decode on any number of cores.
Only PIL and NumPy are needed, so it runs on a machine without TensorFlow (the GPU host of
benchmarks/gpu_session.sh); tf.data's reading and batching, in C++, are not included.
"""
import argparse
from concurrent import futures
import glob
import io
import os
import pathlib
import tempfile
import time

import numpy as np
from PIL import Image

from hml_jax.data import decoders
from hml_jax.tools.benchmark import image_and_batch_sizes
from hml_jax.tools.benchmark import write_photos


def decode_rate(batches, image_size, num_threads, epochs):
  """Images/s decoding every batch `epochs` times over, num_threads batches at a time."""
  count = sum(len(batch[0]) for batch in batches) * epochs

  def decode(batch):  # (encoded, mirror, rows)
    return decoders.decode_batch_with_pil(*batch, image_size)

  with futures.ThreadPoolExecutor(num_threads) as pool:
    list(pool.map(decode, batches[:num_threads]))  # warm-up: threads started, caches filled
    start = time.perf_counter()
    for _ in range(epochs):
      for images in pool.map(decode, batches):
        assert images.shape[1:] == (image_size, image_size, 3)
    return count / (time.perf_counter() - start)


def python_seconds_per_image(image_size: int, repeats: int = 2000) -> float:
  """Seconds per image that decode_batch_with_pil spends in Python, holding the GIL: the same
  calls on an 8x8 JPEG (whose decoding and resizing, the parts PIL runs without the GIL, take
  next to nothing), plus the copy of an image_size x image_size result out of PIL, which holds
  the GIL."""
  buffer = io.BytesIO()
  Image.new('RGB', (8, 8), (90, 120, 200)).save(buffer, format='JPEG')
  tiny = np.array([buffer.getvalue()] * 16, dtype=object)
  mirror, rows = np.arange(16) % 2 == 1, np.arange(16)
  result = Image.new('RGB', (image_size, image_size), (90, 120, 200))

  def timed(function, count):
    function()
    start = time.perf_counter()
    for _ in range(count):
      function()
    return (time.perf_counter() - start) / count

  calls = timed(lambda: decoders.decode_batch_with_pil(tiny, mirror, rows, 8), repeats // 16) / 16
  return calls + timed(lambda: np.asarray(result), repeats // 4)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--num_images', type=int, default=1024)
  parser.add_argument('--image_size', default='224,448', help='comma-separated sizes')
  parser.add_argument('--batch_size',
                      default='64,16',
                      help='one batch size, or one per --image_size (comma-separated)')
  parser.add_argument('--threads',
                      default='',
                      help='comma-separated thread counts; default 1, 2, 4... up to the cores')
  parser.add_argument('--epochs', type=int, default=2, help='passes over the images per row')
  args = parser.parse_args()
  try:
    sizes = image_and_batch_sizes(args.image_size, args.batch_size)
  except ValueError as error:
    parser.error(str(error))
  cores = os.cpu_count() or 1
  if args.threads:
    thread_counts = [int(t) for t in args.threads.split(',')]
  else:
    thread_counts = [t for t in (1, 2, 4, 8, 16, 32, 64, 128) if t < cores] + [cores]
  with tempfile.TemporaryDirectory() as root:
    write_photos(root, args.num_images)
    encoded = [
        pathlib.Path(path).read_bytes()  # closes each file, unlike open().read()
        for path in sorted(glob.glob(os.path.join(root, 'images', '*.jpg')))
    ]
  mirror = np.arange(len(encoded)) % 2 == 1
  for image_size, batch_size in sizes:
    batches = [(np.array(encoded[i:i + batch_size],
                         dtype=object), mirror[i:i + batch_size], np.arange(i, i + batch_size))
               for i in range(0,
                              len(encoded) - batch_size + 1, batch_size)]
    print(f'{cores} CPU cores; {len(batches) * batch_size} JPEGs of 500x375 -> '
          f'{image_size}x{image_size}, batches of {batch_size}, decode_batch_with_pil')
    print('| threads | images/s | ideal (first row per thread x min(threads, cores)) '
          '| share of ideal |')
    print('|---|---|---|---|')
    one_thread = None
    for num_threads in thread_counts:
      rate = decode_rate(batches, image_size, num_threads, args.epochs)
      one_thread = one_thread or rate / min(num_threads, cores)  # the first row's, per thread
      ideal = one_thread * min(num_threads, cores)
      print(f'| {num_threads} | {rate:.0f} | {ideal:.0f} | {rate / ideal:.0%} |', flush=True)
    seconds = python_seconds_per_image(image_size)
    print(
        f'In Python, holding the GIL: about {seconds * 1e6:.0f} us per image, so one process '
        f'decodes at most about {1 / seconds:.0f} images/s, less what handing the GIL from '
        'thread to thread costs.',
        flush=True)


if __name__ == '__main__':
  main()
