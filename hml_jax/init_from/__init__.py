"""config.init_from: where the backbone's initial weights come from, one owner for every source.

  ''                          random initialization (a warning for a torchvision architecture:
                              the paper and its baselines start from ImageNet)
  'torchvision:resnet50'      torchvision's ImageNet weights, also resnet18/34/101: from the cache
                              or torchvision's, else downloaded and verified (torchvision.py)
  'torchvision:/path/file'    a torchvision ResNet state dict (.pth, .pt, .safetensors, .npz)
  'embedded:NAME'             a backbone shipped in hml_jax/weights/ (embedded.py)
  'workdir:DIR'               the backbone of another hml_jax run's best checkpoint

check(spec, model) refuses a malformed spec before any work; fetch(spec, model) finds (or downloads)
what it names before a new run starts; load(spec, model, image_shape) returns the backbone's
{'params', 'batch_stats'}, checked to fit, which train_state.create_train_state puts in place.
"""
import logging
from typing import Any, Dict, Optional, Sequence

import jax
import numpy as np

from hml_jax.init_from import embedded
from hml_jax.init_from import torchvision
from hml_jax.runtime import errors
from hml_jax.runtime import files
from hml_jax.state import train_state
from hml_jax.state import workdir_files

TORCHVISION = torchvision.PREFIX  # 'torchvision:'
EMBEDDED = embedded.PREFIX  # 'embedded:'
WORKDIR = 'workdir:'


def workdir_of(spec: str) -> Optional[str]:
  """'workdir:DIR' -> DIR; None for other specs."""
  return spec[len(WORKDIR):] if spec.startswith(WORKDIR) else None


def check(spec: str, model_name: Optional[str] = None) -> None:
  """Refuses a malformed spec, or weights of another architecture than model_name, naming the
  value and what to set (nothing is read or downloaded)."""
  if not spec:
    return
  if spec.startswith(EMBEDDED):
    embedded.check_spec(spec, model_name)
  elif spec.startswith(WORKDIR):
    if not workdir_of(spec):
      raise errors.InvalidInputError(f'No directory in config.init_from={spec!r}: expected '
                                     f"'{WORKDIR}/path/to/a/run'.")
  elif spec.startswith(TORCHVISION):
    torchvision.check_spec(spec, model_name)
  else:
    others = ', '.join(n for n in torchvision.IMAGENET_WEIGHTS if n != 'resnet50')
    raise errors.InvalidInputError(
        f'Unsupported pretrained-weights spec {spec!r} (config.init_from): expected '
        f"'{TORCHVISION}resnet50' (torchvision's ImageNet weights; also {others}), "
        f"'{TORCHVISION}/path/to/weights.safetensors' (or .pth, .npz), "
        f"'{WORKDIR}/path/to/a/run' (the backbone of an hml_jax run), "
        f"'{EMBEDDED}glyph_resnet_small' (a backbone shipped with hml_jax), or '' to train "
        'from scratch.')


def check_workdir(directory: str, model_name: str) -> None:
  """'workdir:DIR': DIR must hold a finished hml_jax run of the same model; errors name what
  differs."""
  spec = f'{WORKDIR}{directory}'
  if not files.exists(workdir_files.config_path(directory)):
    raise errors.MissingInputError(
        f'config.init_from={spec!r}: {directory} holds no hml_jax run (no '
        'config.json). Train the source run there first.')
  source = workdir_files.read_config(directory)
  if source.model != model_name:
    raise errors.InvalidInputError(
        f"config.init_from={spec!r}: that run's backbone is {source.model!r}, but "
        f'config.model is {model_name!r}.')
  if not files.exists(files.join(directory, 'results.json')):
    raise errors.MissingInputError(
        f'config.init_from={spec!r}: the run in {directory} has not finished '
        '(no results.json): its best checkpoint may still change. Finish '
        'that run first (the same command resumes it).')


def fetch(spec: str, model_name: str) -> None:
  """Before any other work of a new run: what spec (config.init_from) names is there (a run
  finished, a shipped file unchanged, ImageNet weights found or downloaded; an error names where
  to put them), or a warning says that a torchvision ResNet (model_name, config.model) starts
  random."""
  if not spec:
    if model_name in torchvision.IMAGENET_WEIGHTS:
      logging.warning(
          'The %s backbone starts from random weights (config.init_from=\'\'). The paper and its '
          'baselines start from ImageNet weights and their numbers assume them: '
          '--config.init_from=torchvision:%s.', model_name, model_name)
  elif workdir_of(spec) is not None:
    check_workdir(workdir_of(spec), model_name)
  elif spec.startswith(EMBEDDED):
    embedded.load_named(spec)  # present and unchanged
  else:
    torchvision.weights_file(spec)


def check_fits(loaded, model, image_shape: Sequence[int], spec: str) -> None:
  """Raises naming spec if loaded {'params', 'batch_stats'} is not shaped as model's backbone for
  inputs of image_shape (H, W, C)."""
  expected = torchvision.expected_variables(model.backbone, (1,) + tuple(image_shape))
  got = jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), loaded)
  wanted = jax.tree_util.tree_map(lambda a: tuple(a.shape), expected)
  if got != wanted:
    raise errors.InvalidInputError(
        f'config.init_from={spec}: its backbone does not fit this model for inputs '
        f'{tuple(image_shape)} (another number of channels or layers): '
        f'{jax.tree_util.tree_leaves(got)[:3]}... against '
        f'{jax.tree_util.tree_leaves(wanted)[:3]}...')


def load(spec: str,
         model,
         image_shape: Sequence[int],
         model_name: Optional[str] = None) -> Dict[str, Any]:
  """The backbone's {'params', 'batch_stats'} that spec names, checked to fit model's backbone
  for inputs of image_shape (H, W, C); with model_name (config.model), also checked by name. The
  head is never loaded (a torchvision file's 1000-class fc layer and a source run's head are
  dropped)."""
  check(spec, model_name)
  directory = workdir_of(spec)
  if directory is not None:
    check_workdir(directory, model_name or workdir_files.read_config(directory).model)
    loaded = train_state.backbone_of_workdir(directory)
    check_fits(loaded, model, image_shape, spec)
    logging.info('Backbone initialized from the best checkpoint (epoch %d) of %s.',
                 files.read_json(files.join(directory, 'results.json'))['best_epoch'], directory)
    return loaded
  if spec.startswith(EMBEDDED):
    loaded, metadata = embedded.load_named(spec)
    check_fits(loaded, model, image_shape, spec)
    logging.info('Backbone initialized from %s (%s: best epoch %s, source validation mAP %s).',
                 spec, embedded.path_of(embedded.name_of(spec)), metadata.get('best_epoch'),
                 metadata.get('source_val_map'))
    return loaded
  loaded = torchvision.init_variables_from(spec, model.backbone, (1,) + tuple(image_shape))
  logging.info('Backbone initialized from %s (%s).', spec,
               torchvision.weights_file(spec, progress=False))  # verified once per process
  return loaded


def initial_backbone(spec: str, model_name: str, model,
                     image_shape: Sequence[int]) -> Optional[Dict[str, Any]]:
  """load(spec, ...) of a config's init_from and model, or None for a random start (spec '')."""
  return load(spec, model, image_shape, model_name) if spec else None
