"""Makes tests/fixtures/torchvision_resize.npz: images in several formats and modes, and what
Cole et al.'s preprocessing makes of them with torchvision.

Needs torchvision (NOT a requirement of this project; see scripts/make_torchvision_fixture.py
for a separate environment) and runs from the repository root:

  python scripts/make_resize_fixture.py

Their loader opens a file with `Image.open(f).convert('RGB')` (torchvision's pil_loader) and
resizes with `transforms.Resize((size, size))`: bilinear, antialiased when shrinking. The fixture
holds, for each case NAME, 'NAME/encoded' (the file's bytes as uint8) and 'NAME/SIZE' (SIZE, SIZE,
3) uint8 for each of SIZES; tests/test_image_decoders.py checks config.dataset.decoder='pil'
against it byte for byte and 'tensorflow' within a grey level.
"""
import io
import os

import numpy as np
from PIL import Image
from torchvision import transforms

OUTPUT = os.path.join('tests', 'fixtures', 'torchvision_resize.npz')
SIZES = (16, 30, 48)  # shrink both sides (by 2.2x), mixed, enlarge both (the images are 35x25)


def smooth_photo(rng, height, width, channels):
  """A random image with photo-like smooth regions (upsampled noise), so that JPEG keeps it."""
  coarse = rng.randint(0, 256, (height // 5 + 1, width // 5 + 1, channels)).astype(np.uint8)
  mode = 'RGB' if channels == 3 else 'L'
  image = Image.fromarray(coarse if channels == 3 else coarse[:, :, 0], mode)
  return image.resize((width, height), Image.BICUBIC)


def encode(image: Image.Image, format_name: str, **options) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=format_name, **options)
  return buffer.getvalue()


def cases():
  rng = np.random.RandomState(0)
  rgb = smooth_photo(rng, 25, 35, 3)
  gray = smooth_photo(rng, 25, 35, 1)
  rgba = rgb.copy()
  rgba.putalpha(Image.fromarray(rng.randint(0, 256, (25, 35), dtype=np.uint8)))
  return {
      'rgb_jpeg': encode(rgb, 'JPEG', quality=90),
      'gray_jpeg': encode(gray, 'JPEG', quality=90),
      'cmyk_jpeg': encode(rgb.convert('CMYK'), 'JPEG', quality=90),
      'rgb_png': encode(rgb, 'PNG'),
      'rgba_png': encode(rgba, 'PNG'),
      'palette_gif': encode(rgb.convert('P', palette=Image.ADAPTIVE, colors=64), 'GIF'),
      'one_bit_bmp': encode(gray.convert('1'), 'BMP'),
      'rgb_webp': encode(rgb, 'WEBP', quality=90),
  }


def main():
  arrays = {}
  for name, encoded in cases().items():
    arrays[f'{name}/encoded'] = np.frombuffer(encoded, np.uint8)
    image = Image.open(io.BytesIO(encoded)).convert('RGB')  # torchvision's pil_loader
    for size in SIZES:
      arrays[f'{name}/{size}'] = np.asarray(transforms.Resize((size, size))(image))
  np.savez_compressed(OUTPUT, **arrays)
  print(f'Wrote {OUTPUT}: {len(arrays)} arrays, {os.path.getsize(OUTPUT)} bytes.')


if __name__ == '__main__':
  main()
