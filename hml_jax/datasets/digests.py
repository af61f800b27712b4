"""The generated datasets (composite_digits, glyph_pretraining, glyph_source, glyph_digits) are
drawn here, from seeds, with Pillow and the installed fonts, so another Pillow or FreeType can
render other pixels and every documented number would move. Each prepared split's decoded pixels
and labels are digested when it is read (split_digest), written into the run's dataset.json, and
compared with the digests pinned below; a difference is a visible warning that names the Pillow
and FreeType versions, here and at pinning."""
import hashlib
import logging
from typing import Dict, Mapping

import numpy as np

GENERATED = ('composite_digits', 'glyph_pretraining', 'glyph_source', 'glyph_digits')

# The versions the pinned digests were rendered with (this project's development machine).
PINNED_WITH = 'Pillow 13.0.0, FreeType 2.14.3'
# full_name (name/builder_config/version) -> {split: split_digest}.
PINNED: Dict[str, Dict[str, str]] = {
    'composite_digits/default/1.1.0': {
        'train': '65b0197b1cb147eca2fdd60f33c14f51b4055a98c68ee5aa920fff6ed2c425ad',
        'test': '95af8c8a43ea6c9ba341f423a2d1a4af05e3478aa08b0573f4052f2b9f3ba551',
    },
    'composite_digits/tiny/1.1.0': {
        'train': 'c19ae3ae269e72f13e4e684138fd82ec2e57a57194672b37ff793baa29a3c5ea',
        'test': '1d88be7100856a12707156d0b1ca4f36bf90e3ce32b77eba8611d0592ec720d2',
    },
    'glyph_pretraining/default/2.1.0': {
        'train': '38a292166168ea9677ddbcfaafc4cb13d447ea3447019d0376a98752b0e93888',
        'test': 'f24a3b3906a67b2bc9c627cd552eba43e74c5d6f6191fb0cff4d6bfb12b6e511',
    },
    'glyph_pretraining/tiny/2.1.0': {
        'train': 'a33aaea5b2537faff58a4cd7d439a1022f1356091102fab5e31412adce0bce08',
        'test': 'e397ae56d465affd0d21b8cebb04d05f2233855787bffe5efa3df25b45fc3f42',
    },
    'glyph_source/default/2.1.0': {
        'train': 'df230e02ef7c2d2673b2625b946f588211675e31b4b37e6203370ae689d1bfe3',
        'test': 'b1f1c7b9f72fd9e0c6de01574daa23bc0341e8c358fefcced421c900d13cdcb2',
    },
    'glyph_source/tiny/2.1.0': {
        'train': '70cdd5e14408a74df81f93af167a6ddb090fb5e88c71ce3f3f6b86ba5ac446ac',
        'test': '10835863f2b69b4937c1ca3b4e9e84d424cada3d583434796a67cde990d676dd',
    },
    'glyph_digits/default/2.1.0': {
        'train': 'a766214ab087a9da0cd468ae6a4e4410a96f9429de0ddabf29bc19d2b0b7f95e',
        'test': 'ae751194ed7de71c1b0e60e45c1b7d9d14481db01b209d7791779706ef937ecd',
    },
    'glyph_digits/tiny/2.1.0': {
        'train': 'e30ca90fba59dbe463587945b8478e342e4295992c05758dce2fb9442927a11a',
        'test': '0eccd3c189c3560205cd03ad6c0c4998a1e184e06340492e11394008fe74406b',
    },
}


def split_digest(images: np.ndarray, labels: np.ndarray) -> str:
  """SHA-256 of a split's images (uint8, official row order) and labels, with their shapes."""
  digest = hashlib.sha256()
  for array in (np.ascontiguousarray(images), np.ascontiguousarray(labels, np.int32)):
    digest.update(f'{array.dtype}{array.shape}'.encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def rendering_versions() -> str:
  """'Pillow X, FreeType Y' of this process."""
  import PIL  # pylint: disable=g-import-not-at-top
  from PIL import features  # pylint: disable=g-import-not-at-top
  return f"Pillow {PIL.__version__}, FreeType {features.version('freetype2') or 'absent'}"


def check(full_name: str, digests: Mapping[str, str]) -> bool:
  """Compares a prepared generated dataset's digests with the pinned ones; warns (naming both
  rendering versions) and returns False where they differ; True where equal or none is pinned."""
  pinned = PINNED.get(full_name)
  if not pinned:
    return True
  differing = sorted(split for split, value in digests.items() if pinned.get(split) != value)
  if differing:
    logging.warning(
        '%s: the %s split(s) prepared here differ from the pinned pixels and labels (rendered '
        'with %s here; pinned with %s), so the documented results will not be reproduced '
        'bitwise from this dataset. Rendering with the pinned versions makes them equal.',
        full_name, ', '.join(differing), rendering_versions(), PINNED_WITH)
  return not differing
