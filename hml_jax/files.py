"""Workdir files on a local disk or a bucket (gs://...), through etils.epath.

Training on a TPU pod writes to a bucket every worker shares; orbax and clu already accept such
paths, and this module lets the rest of hml_jax (config.json, dataset.json, results.json, tables,
figures) do the same. Local files are replaced atomically (written aside, then renamed), so a
crash never leaves half a file; a bucket replaces whole objects by itself.
"""
import json
import os
from typing import Any

from etils import epath


def is_local(path) -> bool:
  return '://' not in str(path)


def absolute(path) -> str:
  """An absolute local path, or the bucket URL unchanged."""
  return os.path.abspath(path) if is_local(path) else str(path)


def join(path, *parts) -> str:
  return str(epath.Path(path).joinpath(*parts))


def exists(path) -> bool:
  return epath.Path(path).exists()


def is_dir(path) -> bool:
  return epath.Path(path).is_dir()


def listdir(path):
  return [p.name for p in epath.Path(path).iterdir()]


def makedirs(path) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def write_bytes(path, data: bytes) -> None:
  if is_local(path):
    temporary = f'{path}.tmp'
    with open(temporary, 'wb') as f:
      f.write(data)
    os.replace(temporary, path)
  else:
    epath.Path(path).write_bytes(data)


def write_text(path, text: str) -> None:
  write_bytes(path, text.encode('utf-8'))


def write_json(path, value: Any, **options) -> None:
  write_text(path, json.dumps(value, indent=2, **options))


def read_bytes(path) -> bytes:
  return epath.Path(path).read_bytes()


def read_text(path) -> str:
  return epath.Path(path).read_text()


def read_json(path) -> Any:
  return json.loads(read_text(path))


def rename(source, target) -> None:
  epath.Path(source).rename(target)


def installed_config_argv(argv):
  """argv with a --config=configs/NAME.py[:...] that does not exist here pointed at the configs
  package that pip installed with hml_jax, so that the documented commands work from any
  directory after `pip install hml_jax` (a path that exists is left alone)."""
  import configs  # pylint: disable=g-import-not-at-top
  package = os.path.dirname(os.path.abspath(configs.__file__))
  result = []
  for argument in argv:
    if argument.startswith('--config=') and not argument.startswith('--config.'):
      path, colon, rest = argument[len('--config='):].partition(':')
      if not os.path.exists(path) and os.path.dirname(path) in ('configs', '') and \
          os.path.exists(os.path.join(package, os.path.basename(path))):
        argument = f'--config={os.path.join(package, os.path.basename(path))}{colon}{rest}'
    result.append(argument)
  return result
