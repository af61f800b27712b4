"""The module names of hml_jax before its subpackages, kept working: `from hml_jax import heads`
is hml_jax.models.heads, `import hml_jax.train_state` is hml_jax.state.train_state, the same module
objects (docs/development.md, "Names kept from the flat layout"). The command-line tools keep their
`python -m hml_jax.NAME` form through small modules of their own (hml_jax/predict.py, ...), which
run_or_alias serves."""
import importlib
import importlib.abc
import importlib.util
import runpy
import sys

# old name under hml_jax -> the module under hml_jax that it names now
LIBRARY = {
    'allocator': 'runtime.allocator',
    'checkpoints': 'state.checkpoints',
    'cli': 'tools.cli',
    'console': 'runtime.console',
    'decoders': 'data.decoders',
    'downloads': 'runtime.downloads',
    'errors': 'runtime.errors',
    'false_negatives': 'evaluation.false_negatives',
    'files': 'runtime.files',
    'heads': 'models.heads',
    'host': 'runtime.host',
    'initializers': 'models.initializers',
    'input_pipeline': 'training.input_pipeline',
    'labels': 'data.labels',
    'layers': 'models.layers',
    'linear_init': 'training.linear_init',
    'loop': 'training.loop',
    'losses': 'methods.losses',
    'metrics': 'evaluation.metrics',
    'npz_files': 'data.npz_files',
    'preemption': 'training.preemption',
    'pretrained': 'init_from.torchvision',
    'pth_files': 'init_from.pth_files',
    'recipes': 'methods.recipes',
    'sharding': 'state.sharding',
    'sources': 'data.sources',
    'splits': 'data.splits',
    'steps': 'state.steps',
    'summaries': 'training.summaries',
    'train': 'training.train',
    'train_state': 'state.train_state',
}


class _Alias(importlib.abc.Loader):
  """Loads an old name as the module it names now (one module object under both names)."""

  def __init__(self, target: str):
    self.target = target

  def create_module(self, spec):
    return importlib.import_module(self.target)

  def exec_module(self, module):
    pass  # already executed under its own name


class _Finder(importlib.abc.MetaPathFinder):

  def find_spec(self, fullname, path=None, target=None):
    del path, target
    name = fullname[len('hml_jax.'):] if fullname.startswith('hml_jax.') else None
    if name not in LIBRARY:
      return None
    return importlib.util.spec_from_loader(fullname, _Alias(f'hml_jax.{LIBRARY[name]}'))


def install() -> None:
  if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
    sys.meta_path.append(_Finder())


def run_or_alias(name: str, tool: str, library: str = '') -> None:
  """A tool's old module: run as a program (`python -m hml_jax.NAME`), it runs the tool's module
  as __main__; imported, it is the library module (the tool's own by default)."""
  if name == '__main__':
    runpy.run_module(tool, run_name='__main__', alter_sys=True)
  else:
    sys.modules[name] = importlib.import_module(library or tool)
