"""Backbones that ship inside the package: config.init_from='embedded:NAME'.

The paper fine-tunes an ImageNet-pretrained ResNet-50; offline, the pretraining stage of the
paper's regime (configs/glyph_pretraining.py, docs/results.md) takes longer than the quickstart's
budget, so the results of the source runs are committed as .safetensors files under
hml_jax/weights/ and the quickstart (configs/glyph_digits.py) starts from one, as a user of the
paper starts from torchvision's file. Each file is

  - the backbone's variables of a finished hml_jax run's best checkpoint, flattened to
    'params/<module>/.../<name>' and 'batch_stats/<module>/.../<name>' float32 tensors;
  - metadata (str -> str, as safetensors stores it): 'model', 'image_shape' (JSON, H W C),
    'best_epoch', 'source_val_map', 'source_config' (the run's whole config, JSON) and
    'regenerate' (the command that rebuilds the file bitwise on the same kind of machine);
  - pinned by its SHA-256 in BACKBONES, checked at every load.

  python -m hml_jax.embedded_backbones --workdir=RUN --output=FILE.safetensors

exports any run's backbone in this format (what the regeneration command does;
hml_jax/tools/export_backbone.py).
"""
import dataclasses
import hashlib
import json
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from hml_jax.runtime import errors
from hml_jax.runtime import files
from hml_jax.state import train_state
from hml_jax.state import workdir_files

PREFIX = 'embedded:'
# The package's weights/ folder (package data), beside this package.
DIRECTORY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'weights')


@dataclasses.dataclass(frozen=True)
class EmbeddedBackbone:
  filename: str  # under hml_jax/weights/
  model: str  # the config.model it fits
  source_config: str  # configs/<source_config>.py trained it
  sha256: str  # of the whole file
  regenerate: str  # the command that rebuilds it


BACKBONES = {
    # The paper's regime offline (docs/results.md): resnet_small pretrained with full labels on
    # glyph_pretraining (32 printed glyph classes), the best of 24 epochs by validation mAP.
    'glyph_resnet_small':
        EmbeddedBackbone(
            filename='glyph_resnet_small.safetensors',
            model='resnet_small',
            source_config='glyph_pretraining',
            sha256='d5bb59b311d64e5c9844815cb9ea64e622fa00f6c8296c5944d7f1cf38b7f6c7',
            regenerate='PYTHONPATH=. python scripts/paper_regime.py pretraining --out=runs/regime '
            '&& python -m hml_jax.embedded_backbones --workdir=runs/regime/pretraining '
            '--output=hml_jax/weights/glyph_resnet_small.safetensors'),
    # The strong source (docs/results.md, "When HML helps"): resnet_small pretrained with full
    # labels on glyph_source (190 glyph classes, printed or blocky), the best epoch of 40 by
    # source validation mAP.
    'glyph_source_resnet_small':
        EmbeddedBackbone(
            filename='glyph_source_resnet_small.safetensors',
            model='resnet_small',
            source_config='glyph_source_pretraining',
            sha256='0a8f869a6857ff0ecd73066525cd9bdf1634acf77a72dd3bf7eac34ba3d0d003',
            regenerate='python -m hml_jax.main --config=configs/glyph_source_pretraining.py '
            '--workdir=runs/regime/source_pretraining && python -m hml_jax.embedded_backbones '
            '--workdir=runs/regime/source_pretraining '
            '--output=hml_jax/weights/glyph_source_resnet_small.safetensors'),
    # The second strong source (docs/results.md, "When HML helps"): the same run with the
    # learning rate divided by 10 after epoch 25, the best epoch of 35 by source validation mAP.
    'glyph_source_decay_resnet_small':
        EmbeddedBackbone(
            filename='glyph_source_decay_resnet_small.safetensors',
            model='resnet_small',
            source_config='glyph_source_decay_pretraining',
            sha256='a3be55faf1ddd9155cd1a4f478bd9e47d17a5a0c71d8e790ca53c1f841c3bc0b',
            regenerate='python -m hml_jax.main --config=configs/glyph_source_decay_pretraining.py '
            '--workdir=runs/regime/source_decay_pretraining && python -m hml_jax.embedded_backbones '
            '--workdir=runs/regime/source_decay_pretraining '
            '--output=hml_jax/weights/glyph_source_decay_resnet_small.safetensors'),
    # The third strong source (docs/results.md, "When HML helps"): the second's run on
    # resnet_small_wide (512 features), the best epoch of 35 by source validation mAP.
    'glyph_source_decay_resnet_small_wide':
        EmbeddedBackbone(
            filename='glyph_source_decay_resnet_small_wide.safetensors',
            model='resnet_small_wide',
            source_config='glyph_source_wide_pretraining',
            sha256='6a8c92e0a8ce759b2e7d9ad6fd427068668547a574f7e407434bb72023c9b72c',
            regenerate='python -m hml_jax.main --config=configs/glyph_source_wide_pretraining.py '
            '--workdir=runs/regime/source_wide_pretraining && python -m hml_jax.embedded_backbones '
            '--workdir=runs/regime/source_wide_pretraining '
            '--output=hml_jax/weights/glyph_source_decay_resnet_small_wide.safetensors'),
}


def name_of(spec: str) -> Optional[str]:
  """'embedded:glyph_resnet_small' -> 'glyph_resnet_small'; None for other specs."""
  return spec[len(PREFIX):] if spec.startswith(PREFIX) else None


def check_spec(spec: str, model_name: Optional[str] = None) -> None:
  """Rejects an unknown name, or a backbone of another architecture than config.model."""
  name = name_of(spec)
  if name not in BACKBONES:
    raise errors.InvalidInputError(
        f'config.init_from={spec!r}: no embedded backbone {name!r}; hml_jax ships '
        f'{", ".join(PREFIX + known for known in BACKBONES)}.')
  if model_name is not None and BACKBONES[name].model != model_name:
    raise errors.InvalidInputError(
        f'config.init_from={spec!r} is a {BACKBONES[name].model} backbone, but '
        f'config.model is {model_name!r}: set --config.model='
        f"{BACKBONES[name].model} or another init_from.")


def path_of(name: str) -> str:
  return os.path.join(DIRECTORY, BACKBONES[name].filename)


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def _flatten(tree: Mapping[str, Any], prefix: str) -> Dict[str, np.ndarray]:
  flat = {}
  for key in sorted(tree):
    value = tree[key]
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f'{prefix}/{key}'))
    else:
      flat[f'{prefix}/{key}'] = np.ascontiguousarray(np.asarray(value, np.float32))
  return flat


def _unflatten(flat: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  tree: Dict[str, Any] = {'params': {}, 'batch_stats': {}}
  for path, value in flat.items():
    keys = path.split('/')
    node = tree
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = value
  return tree


def save(variables: Mapping[str, Any], path: str, metadata: Mapping[str, str]) -> None:
  """Writes {'params', 'batch_stats'} of a backbone to path (.safetensors), atomically."""
  from safetensors.numpy import save as serialize  # pylint: disable=g-import-not-at-top
  flat = {
      **_flatten(variables['params'], 'params'),
      **_flatten(variables.get('batch_stats', {}), 'batch_stats')
  }
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  temporary = path + '.tmp'
  serialized = serialize(flat, metadata={key: str(value) for key, value in metadata.items()})
  with open(temporary, 'wb') as f:
    f.write(canonical_safetensors(serialized))
  os.replace(temporary, path)


def canonical_safetensors(serialized: bytes) -> bytes:
  """The same .safetensors file with its JSON header's keys sorted. safetensors writes the
  metadata in the order of a Rust HashMap, which changes from process to process, so the same
  tensors and metadata gave files with different bytes (and SHA-256s). Layout: an 8-byte
  little-endian header length, the header (JSON, padded with spaces to a multiple of 8 bytes),
  then the tensors' bytes, at offsets relative to their start (so they do not move)."""
  length = int.from_bytes(serialized[:8], 'little')
  header = json.loads(serialized[8:8 + length])
  text = json.dumps(header, sort_keys=True, separators=(',', ':')).encode()
  text += b' ' * (-len(text) % 8)
  return len(text).to_bytes(8, 'little') + text + serialized[8 + length:]


def load(path: str) -> Tuple[Dict[str, Any], Dict[str, str]]:
  """({'params', 'batch_stats'} as NumPy trees, metadata) of a file written by save()."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  with safe_open(path, framework='numpy') as f:
    metadata = dict(f.metadata() or {})
    flat = {key: f.get_tensor(key) for key in f.keys()}
  unknown = sorted(key for key in flat if key.split('/')[0] not in ('params', 'batch_stats'))
  if unknown:
    raise errors.InvalidInputError(
        f'{path}: not an hml_jax backbone file (tensors {unknown[:3]} are neither '
        "under 'params/' nor 'batch_stats/').")
  return _unflatten(flat), metadata


def load_named(spec: str) -> Tuple[Dict[str, Any], Dict[str, str]]:
  """The backbone named by config.init_from='embedded:NAME', after checking its SHA-256."""
  check_spec(spec)
  name = name_of(spec)
  path = path_of(name)
  if not os.path.isfile(path):
    raise errors.MissingInputError(
        f'config.init_from={spec!r}: {path} is missing from this install of '
        f'hml_jax. Rebuild it with: {BACKBONES[name].regenerate}')
  digest = sha256_of(path)
  if BACKBONES[name].sha256 and digest != BACKBONES[name].sha256:
    raise errors.InvalidInputError(
        f'config.init_from={spec!r}: {path} has SHA-256 {digest}, not the '
        f'{BACKBONES[name].sha256} this version of hml_jax ships; restore it (git '
        f'checkout) or rebuild it with: {BACKBONES[name].regenerate}')
  return load(path)


def export_workdir(workdir: str, output: str) -> Dict[str, str]:
  """Writes the backbone of workdir's best checkpoint to output; returns the metadata."""
  config = workdir_files.read_config(workdir)
  info = workdir_files.read_dataset_info(workdir)
  results = files.read_json(files.join(workdir, 'results.json'))
  image_shape = tuple(info['example_shape'])
  variables = train_state.backbone_of_workdir(workdir)
  metadata = {
      'model':
          config.model,
      'image_shape':
          json.dumps(list(image_shape)),
      'best_epoch':
          str(results['best_epoch']),
      'source_val_map':
          f"{results['val_map']:.4f}",
      'source_dataset':
          f'{config.dataset.name}/{config.dataset.builder_config}',
      'source_config':
          json.dumps(workdir_files.without_later_defaults(config.to_dict()), sort_keys=True),
  }
  for name, backbone in BACKBONES.items():
    if backbone.filename == os.path.basename(output):
      metadata['regenerate'] = BACKBONES[name].regenerate
  save(variables, output, metadata)
  return metadata
