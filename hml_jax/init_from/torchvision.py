"""Pretrained backbone weights: torchvision ResNet state dicts -> Flax variables of models.ResNet.

Conventions. A torchvision state dict maps parameter names ('conv1.weight', 'bn1.running_mean',
'layer1.0.downsample.0.weight', ...) to arrays in PyTorch's layouts: convolution kernels OIHW
(out, in, height, width), BatchNorm vectors (C,). Our backbones take images NHWC (batch, height,
width, channels) and keep convolution kernels HWIO (height, width, in, out), so conversion is

  '<m>.weight' of a convolution, OIHW    -> params/<m'>/kernel, HWIO (transpose (2, 3, 1, 0))
  '<m>.weight' of a BatchNorm             -> params/<m'>/scale
  '<m>.bias' of a BatchNorm               -> params/<m'>/bias
  '<m>.running_mean' / '<m>.running_var'  -> batch_stats/<m'>/mean / var
  '<m>.num_batches_tracked'               -> ignored (Flax keeps no such counter)
  'fc.weight', 'fc.bias'                  -> dropped (the multi-label head replaces fc)

where the module path <m'> is torchvision's with the block index joined by '_' and the
downsample's Sequential indices named: 'layer2.0.downsample.0' -> layer2_0/downsample_conv,
'layer2.0.downsample.1' -> layer2_0/downsample_bn. Floating arrays are cast to float32 (our
parameters are float32 even for a bfloat16 backbone). The numerics match torchvision's: BatchNorm
epsilon 1e-5, symmetric padding (3 for the 7x7/2 stem convolution, 1 for the 3x3/2 max-pool and
the 3x3 convolutions), stride on the 3x3 convolution of a bottleneck (ResNet v1.5).

ImageNet weights. 'torchvision:resnet50' (or resnet18, resnet34, resnet101) names torchvision's
IMAGENET1K_V1 weights of that architecture (ResNet50_Weights.IMAGENET1K_V1: 76.1% top-1), the file
https://download.pytorch.org/models/resnet50-0676ba61.pth and its kin (IMAGENET_WEIGHTS). It is
taken from the cache ($HML_JAX_CACHE, else ~/.cache/hml_jax) or from torchvision's own
($TORCH_HOME/hub/checkpoints), else downloaded into the cache and checked against its SHA-256
(hml_jax/runtime/downloads.py), and read without torch by hml_jax/init_from/pth_files.py, which refuses any pickle
that names code other than tensors. 'torchvision:/path/file' reads a file of one's own
(.safetensors, .npz, or a .pth / .pt zip archive of torch.save). These weights expect RGB
images scaled to [0, 1] and normalized with ImageNet's mean (0.485, 0.456, 0.406) and std
(0.229, 0.224, 0.225), and the 7x7 stem (not small_inputs).
"""
import dataclasses
import os
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from hml_jax.data import npz_files
from hml_jax.init_from import pth_files
from hml_jax.runtime import downloads
from hml_jax.runtime import errors

PREFIX = 'torchvision:'
SUPPORTED_EXTENSIONS = ('.safetensors', '.npz', '.pth', '.pt')


@dataclasses.dataclass(frozen=True)
class WeightsFile:
  url: str
  sha256: str  # of the whole file; torchvision's file name carries its first 8 hex digits
  max_bytes: Optional[int] = None  # a download stops here (downloads.download); None: no bound

  @property
  def filename(self) -> str:
    return os.path.basename(self.url)


def _mib(count: int) -> int:
  return count * 2**20


# torchvision's IMAGENET1K_V1 weights (torchvision/models/resnet.py, ResNet*_Weights), the files
# the paper and its baselines start from (Cole et al. load resnet50(pretrained=True)). Each bound
# is 1.1 times the file size torchvision documents (meta['_file_size'], "MB": 44.661, 83.275,
# 97.781, 170.511), read as MiB (the larger reading), rounded up to a whole MiB.
IMAGENET_WEIGHTS = {
    'resnet18':
        WeightsFile('https://download.pytorch.org/models/resnet18-f37072fd.pth',
                    'f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec',
                    max_bytes=_mib(50)),
    'resnet34':
        WeightsFile('https://download.pytorch.org/models/resnet34-b627a593.pth',
                    'b627a593bcbe140c234610266fe4f8ae95ea42fc881d091c9b6052e6b1d0590f',
                    max_bytes=_mib(92)),
    'resnet50':
        WeightsFile('https://download.pytorch.org/models/resnet50-0676ba61.pth',
                    '0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a',
                    max_bytes=_mib(108)),
    'resnet101':
        WeightsFile('https://download.pytorch.org/models/resnet101-63fe2227.pth',
                    '63fe2227b86e8f1f2063f43a75c84d195911b6a0eace650907dd3dc62dd49a0a',
                    max_bytes=_mib(188)),
}
# What a user can do when a download fails, besides putting the file in place by hand.
DOWNLOAD_ADVICE = "Or train from scratch with --config.init_from=''."

Path = Tuple[str, ...]  # (collection, module..., variable), e.g. ('params', 'bn1', 'scale')

_BN_VARIABLES = {
    'weight': ('params', 'scale'),
    'bias': ('params', 'bias'),
    'running_mean': ('batch_stats', 'mean'),
    'running_var': ('batch_stats', 'var')
}
_DOWNSAMPLE = {'0': 'downsample_conv', '1': 'downsample_bn'}
_CONV_NAME = re.compile(r'conv\d+$|downsample_conv$')
_BN_NAME = re.compile(r'bn\d+$|downsample_bn$')
_DROPPED = ('fc.weight', 'fc.bias')
_IGNORED_SUFFIX = '.num_batches_tracked'


def _flax_path(name: str) -> Optional[Path]:
  """torchvision name -> Flax variable path, or None if the name is not one of a ResNet's."""
  parts = name.split('.')
  if len(parts) == 2:  # stem: conv1.weight, bn1.*
    modules, variable = [parts[0]], parts[1]
  elif len(parts) == 4 and re.fullmatch(r'layer\d+', parts[0]) and parts[1].isdigit():
    modules, variable = [f'{parts[0]}_{parts[1]}', parts[2]], parts[3]
  elif (len(parts) == 5 and re.fullmatch(r'layer\d+', parts[0]) and parts[1].isdigit() and
        parts[2] == 'downsample' and parts[3] in _DOWNSAMPLE):
    modules, variable = [f'{parts[0]}_{parts[1]}', _DOWNSAMPLE[parts[3]]], parts[4]
  else:
    return None
  if _CONV_NAME.fullmatch(modules[-1]) and variable == 'weight':
    return ('params', *modules, 'kernel')
  if _BN_NAME.fullmatch(modules[-1]) and variable in _BN_VARIABLES:
    collection, flax_variable = _BN_VARIABLES[variable]
    return (collection, *modules, flax_variable)
  return None


def _torchvision_name(path: Path) -> str:
  """Inverse of _flax_path (for error messages): ('params', 'layer1_0', 'conv1', 'kernel') ->
  'layer1.0.conv1.weight'."""
  collection, *modules, variable = path
  names = []
  for module in modules:
    match = re.fullmatch(r'(layer\d+)_(\d+)', module)
    if match:
      names += [match.group(1), match.group(2)]
    elif module == 'downsample_conv':
      names += ['downsample', '0']
    elif module == 'downsample_bn':
      names += ['downsample', '1']
    else:
      names.append(module)
  inverse = {value: key for key, value in _BN_VARIABLES.items()}
  variable = 'weight' if variable == 'kernel' else inverse.get((collection, variable), variable)
  return '.'.join(names + [variable])


def _show(path: Path) -> str:
  return f"{'/'.join(path)} (torchvision {_torchvision_name(path)!r})"


def _listing(items, limit: int = 12) -> str:
  items = list(items)
  more = f'; ... and {len(items) - limit} more' if len(items) > limit else ''
  return '; '.join(items[:limit]) + more


def _flatten(tree: Mapping[str, Any], prefix: Path = ()) -> Dict[Path, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, prefix + (key,)))
    else:
      flat[prefix + (key,)] = value
  return flat


def _unflatten(flat: Mapping[Path, Any]) -> Dict[str, Any]:
  tree: Dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def expected_variables(backbone, image_shape: Sequence[int]) -> Dict[str, Any]:
  """The backbone's variables as jax.ShapeDtypeStruct trees, without computing anything;
  image_shape is NHWC (batch, height, width, channels)."""
  images = jax.ShapeDtypeStruct(tuple(image_shape), jnp.float32)
  return jax.eval_shape(lambda x: backbone.init(jax.random.key(0), x), images)


def from_torchvision(state_dict: Mapping[str, Any],
                     backbone=None,
                     image_shape: Optional[Sequence[int]] = None) -> Dict[str, Any]:
  """Converts a torchvision ResNet state dict to {'params': ..., 'batch_stats': ...} for our
  backbone (see the module docstring for the name and layout mapping).

  state_dict maps torchvision names to arrays (NumPy, or anything np.asarray accepts) in
  PyTorch's layouts (convolution kernels OIHW). The result holds float32 NumPy arrays, kernels
  HWIO, as nested dicts that backbone.apply accepts. Names that are not a ResNet's (other than
  num_batches_tracked, which is ignored, and fc.*, which is dropped) are a ValueError naming them.

  If backbone (a Flax module, e.g. models.get_backbone('resnet50')) is given, the result is
  checked against its variables as jax.eval_shape(backbone.init, ...) gives them, for images of
  image_shape (NHWC; default (1, 224, 224, in_channels of conv1.weight)): any variable missing,
  any unexpected one, and any shape mismatch is a ValueError naming them with both names and the
  shapes.
  """
  flat: Dict[Path, np.ndarray] = {}
  sources: Dict[Path, Tuple[str, Tuple[int, ...]]] = {}
  unknown = []
  for name, value in state_dict.items():
    if name.endswith(_IGNORED_SUFFIX) or name in _DROPPED:
      continue
    path = _flax_path(name)
    if path is None:
      unknown.append(name)
      continue
    array = np.asarray(value)
    if np.issubdtype(array.dtype, np.floating) or array.dtype == jnp.bfloat16:
      array = array.astype(np.float32)
    if path[-1] == 'kernel':
      if array.ndim != 4:
        raise errors.InvalidInputError(
            f'{name!r}: a convolution kernel must be 4-D OIHW, got shape '
            f'{array.shape}.')
      array = np.ascontiguousarray(array.transpose(2, 3, 1, 0))  # OIHW -> HWIO
    flat[path] = array
    sources[path] = (name, tuple(np.shape(value)))
  if unknown:
    more = f' and {len(unknown) - 20} more' if len(unknown) > 20 else ''
    raise errors.InvalidInputError(
        f'{len(unknown)} state-dict entries are not parameters of a torchvision ResNet (a '
        f'backbone conv*/bn*/layer*/downsample or fc): {sorted(unknown)[:20]}{more}. Is this a '
        "ResNet checkpoint, with names as torchvision's ResNet.state_dict() gives them (no "
        "'module.' prefix)?")

  if backbone is not None:
    if image_shape is None:
      conv1 = flat.get(('params', 'conv1', 'kernel'))
      image_shape = (1, 224, 224, conv1.shape[2] if conv1 is not None else 3)
    expected = _flatten(expected_variables(backbone, image_shape))
    problems = []
    missing = sorted(set(expected) - set(flat))
    if missing:
      problems.append(f'{len(missing)} missing: ' + _listing(
          f'{_show(path)} of shape {tuple(expected[path].shape)}' for path in missing))
    unexpected = sorted(set(flat) - set(expected))
    if unexpected:
      problems.append(f'{len(unexpected)} unexpected (not in the backbone): ' + _listing(
          f'{sources[path][0]!r} of shape {sources[path][1]}' for path in unexpected))
    mismatched = sorted(path for path in set(flat) & set(expected)
                        if flat[path].shape != tuple(expected[path].shape))
    if mismatched:
      problems.append(f'{len(mismatched)} shape mismatches: ' + _listing(
          f'{sources[path][0]!r} of shape {sources[path][1]} gives {"/".join(path)} of shape '
          f'{flat[path].shape}, the backbone expects {tuple(expected[path].shape)}'
          for path in mismatched))
    if problems:
      raise errors.InvalidInputError(
          f'The torchvision state dict does not fit the backbone {type(backbone).__name__} '
          f"(kernels compared in Flax's HWIO layout; is it the same architecture, e.g. "
          f"resnet50 weights for model 'resnet50'?):\n  " + '\n  '.join(problems))
  return _unflatten(flat)


def _read_safetensors(path: str) -> Dict[str, np.ndarray]:
  """The safetensors package checks the header against the file (offsets inside it, each
  tensor's bytes its shape's) before it reads anything; any failure is one user error."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    return dict(load_file(path))
  except Exception as error:  # pylint: disable=broad-except  (SafetensorError, and others)
    raise errors.InvalidInputError(
        f'{path} is not a readable .safetensors file ({type(error).__name__}: '
        f'{str(error)[:300]}); use a state dict file you trust.') from None


def load_state_dict(path: str) -> Dict[str, np.ndarray]:
  """Reads a state dict (name -> NumPy array, PyTorch layouts) from a file, by its extension.

  .safetensors: the `safetensors` package's NumPy API.
  .npz: without pickles, in memory bounded by the file (hml_jax.data.npz_files).
  .pth / .pt: the zip archive that torch.save writes, read by hml_jax.init_from.pth_files without torch;
    a pickle that names anything but tensors is refused (pth_files.UnsafePickleError).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise errors.MissingInputError(f'No state-dict file {path!r}.')
  extension = os.path.splitext(path)[1].lower()
  if extension == '.safetensors':
    return _read_safetensors(path)
  if extension == '.npz':
    return npz_files.read_arrays(path, remedy='use a state dict file you trust')
  if extension in ('.pth', '.pt'):
    return pth_files.read_state_dict(path)
  raise errors.InvalidInputError(
      f'Unsupported state-dict file {path!r}: the extension must be one of '
      f'{", ".join(SUPPORTED_EXTENSIONS)}.')


def named_weights(spec: str) -> Optional[str]:
  """'torchvision:resnet50' -> 'resnet50'; None for a path ('torchvision:/x/y.pth')."""
  rest = spec[len(PREFIX):] if spec.startswith(PREFIX) else None
  return rest if rest in IMAGENET_WEIGHTS else None


def check_spec(spec: str, model_name: Optional[str] = None) -> None:
  """Rejects a malformed 'torchvision:...' spec, or ImageNet weights of another architecture
  than config.model, before any work is done (nothing is read or downloaded). Every other form
  of config.init_from is init_from.check's."""
  if not spec.startswith(PREFIX):
    raise errors.InvalidInputError(
        f"config.init_from={spec!r} is not a torchvision spec: expected '{PREFIX}resnet50' or "
        f"'{PREFIX}/path/to/weights.safetensors' (hml_jax/init_from/__init__.py lists every source)."
    )
  rest = spec[len(PREFIX):]
  if not rest:
    raise errors.InvalidInputError(f'No file or name in the pretrained-weights spec {spec!r}.')
  name = named_weights(spec)
  if name is None and not (os.sep in rest or '/' in rest or
                           os.path.splitext(rest)[1].lower() in SUPPORTED_EXTENSIONS):
    raise errors.InvalidInputError(
        f'config.init_from={spec!r}: {rest!r} is neither one of torchvision\'s '
        f'ImageNet weights ({", ".join(IMAGENET_WEIGHTS)}) nor a path to a weights '
        f'file ({", ".join(SUPPORTED_EXTENSIONS)}).')
  if name is not None and model_name is not None and name != model_name:
    if model_name in IMAGENET_WEIGHTS:
      advice = (f'Set --config.init_from={PREFIX}{model_name}, a weights file of that '
                "architecture, or '' to train from scratch.")
    else:
      advice = ("torchvision has no ImageNet weights for it: set --config.init_from='' to train "
                f"from scratch, or use one of {', '.join(IMAGENET_WEIGHTS)}.")
    raise errors.InvalidInputError(
        f'config.init_from={spec!r} holds the weights of {name}, but config.model is '
        f'{model_name!r}. {advice}')


def torch_hub_checkpoints() -> str:
  """Where torchvision caches its weights: $TORCH_HOME/hub/checkpoints (TORCH_HOME defaults to
  $XDG_CACHE_HOME/torch, else ~/.cache/torch)."""
  torch_home = os.environ.get('TORCH_HOME') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'), 'torch')
  return os.path.join(torch_home, 'hub', 'checkpoints')


def weights_file(spec: str, progress: bool = True) -> str:
  """The local file that spec names: for 'torchvision:resnet50' and its kin a verified copy from
  the cache or torchvision's, downloaded if neither has it (downloads.DownloadError, naming the
  URL, the path to put the file at and its digest, if that fails); else the path itself."""
  check_spec(spec)
  name = named_weights(spec)
  if name is None:
    path = spec[len(PREFIX):]
    if not os.path.isfile(path):
      raise errors.MissingInputError(f'config.init_from={spec!r}: no file {path}.')
    return path
  weights = IMAGENET_WEIGHTS[name]
  key = (weights.url, weights.sha256)
  if key in _VERIFIED and _unchanged(_VERIFIED[key]):
    return _VERIFIED[key][0]
  path = downloads.cached_or_download(weights.url,
                                      weights.sha256,
                                      weights.filename,
                                      other_places=(torch_hub_checkpoints(),),
                                      progress=progress,
                                      max_bytes=weights.max_bytes,
                                      advice=DOWNLOAD_ADVICE)
  _VERIFIED[key] = (path, os.stat(path).st_size, os.stat(path).st_mtime_ns)
  return path


# Files this process has verified: (url, sha256) -> (path, size, mtime), so that a run hashes its
# 100 MB weights once, not at every use.
_VERIFIED: Dict[Tuple[str, str], Tuple[str, int, int]] = {}


def _unchanged(entry) -> bool:
  path, size, mtime = entry
  try:
    status = os.stat(path)
  except OSError:
    return False
  return status.st_size == size and status.st_mtime_ns == mtime


def init_variables_from(spec: str, backbone, image_shape: Sequence[int]) -> Dict[str, Any]:
  """Backbone variables {'params', 'batch_stats'} from spec: 'torchvision:resnet50' (and
  resnet18/34/101: torchvision's ImageNet weights, from the cache or downloaded) or
  'torchvision:/path/to/file' (a .safetensors, .npz, .pth or .pt torchvision ResNet state dict),
  loaded, converted and checked against the backbone for images of image_shape, NHWC (batch,
  height, width, channels)."""
  return from_torchvision(load_state_dict(weights_file(spec)),
                          backbone=backbone,
                          image_shape=image_shape)
