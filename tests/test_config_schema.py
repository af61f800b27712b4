"""The closed config schema: configs/default.py declares every key the package reads, no code
reads a config with a defaulted .get(, and a workdir written before a key existed is read as it
ran (workdir_files.KEYS_ADDED_LATER)."""
import ast
import json
import os

import pytest

from hml_jax.configs import default
from hml_jax.state import workdir_files
from hml_jax.tools import evaluate
from hml_jax.training import train

from helpers import tiny_config

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'hml_jax')
CONFIG_NAMES = ('config', 'dataset_config', 'dataset', 'source_config', 'template_config')


def _reads_config(node) -> bool:
  """config / dataset_config / x.config / x.dataset / config.dataset: a ConfigDict by name."""
  if isinstance(node, ast.Name):
    return node.id in CONFIG_NAMES
  return isinstance(node, ast.Attribute) and node.attr in ('config', 'dataset')


def test_no_config_is_read_with_a_default():
  found = []
  for directory, _, names in os.walk(PACKAGE):
    for name in names:
      if not name.endswith('.py'):
        continue
      path = os.path.join(directory, name)
      with open(path) as f:
        tree = ast.parse(f.read())
      for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and
            node.func.attr == 'get' and _reads_config(node.func.value)):
          found.append(f'{os.path.relpath(path, PACKAGE)}:{node.lineno}')
  assert not found, f'defaulted reads of a config (declare the key in configs/default.py): {found}'


def test_keys_added_later_are_declared_with_their_absent_meaning():
  """Each listed key exists in configs/default.py; its absent meaning is the declared default,
  except where older runs did otherwise (then a resume is refused, naming the key)."""
  declared = workdir_files.flatten(default.get_config().to_dict())
  for key in workdir_files.KEYS_ADDED_LATER:
    assert key in declared, key
  differing = {
      key for key, value in workdir_files.KEYS_ADDED_LATER.items() if declared[key] != value
  }
  assert differing == {'adaptive_scale'}


def test_a_current_config_round_trips_the_added_keys():
  config = default.get_config().to_dict()
  assert workdir_files.with_later_keys(workdir_files.without_later_defaults(config)) == json.loads(
      json.dumps(workdir_files.unflatten(workdir_files.flatten(config))))


@pytest.mark.slow
def test_a_workdir_from_before_the_added_keys_resumes_and_evaluates(tfds_dir, tmp_path):
  """config.json without every key added later: the run resumes (bitwise the uninterrupted run)
  and evaluates; without adaptive_scale too, it ran as 'balance', so resuming it under 'spread' is
  refused with the key named."""
  uninterrupted = train.train_and_evaluate(tiny_config(tfds_dir, num_epochs=2),
                                           str(tmp_path / 'whole'))
  workdir = tmp_path / 'older'
  train.train_and_evaluate(tiny_config(tfds_dir, num_epochs=1), str(workdir))
  path = workdir / 'config.json'
  saved = json.loads(path.read_text())
  flat = workdir_files.flatten(saved)
  older = {
      k: v
      for k, v in flat.items()
      if k not in workdir_files.KEYS_ADDED_LATER or k == 'adaptive_scale'
  }
  path.write_text(json.dumps(workdir_files.unflatten(older)))
  resumed = train.train_and_evaluate(tiny_config(tfds_dir, num_epochs=2), str(workdir))
  assert resumed['epochs'][-1]['test_map'] == uninterrupted['epochs'][-1]['test_map']
  assert evaluate.evaluate_workdir(str(workdir))['map'] > 0

  del older['adaptive_scale']
  path.write_text(json.dumps(workdir_files.unflatten(older)))
  with pytest.raises(Exception, match=r"adaptive_scale: 'balance' in the workdir, 'spread' now"):
    train.train_and_evaluate(tiny_config(tfds_dir, num_epochs=3), str(workdir))


def test_an_added_key_under_a_value_is_not_filled_in():
  """A workdir that held delta_rel_by_method as a value (None) keeps it; an absent parent is
  filled in whole."""
  assert workdir_files.with_later_keys({'delta_rel_by_method': None})['delta_rel_by_method'] is None
  assert workdir_files.with_later_keys({})['delta_rel_by_method'] == {
      'll_r': 0.5,
      'll_ct': 0.2,
      'll_cp': 0.1
  }


def test_the_head_phase_has_no_schedule_or_measurement_of_the_run():
  from hml_jax.training import linear_init  # pylint: disable=g-import-not-at-top
  from hml_jax.methods import recipes
  config = default.get_config()
  config.learning_rate_decay_epochs, config.false_negative_images = (3,), 100
  head = linear_init.head_config(
      config,
      recipes.Recipe(linear_init_epochs=5, linear_init_learning_rate=1e-3,
                     linear_init_batch_size=8))
  assert tuple(head.learning_rate_decay_epochs) == () and head.false_negative_images == 0


# The layers below training/ (docs/development.md): their functions take the values they need,
# a settings dataclass (built by its from_config) or a sub-config, never the whole ConfigDict.
BELOW_THE_LOOP = ('runtime', 'models', 'data', 'methods', 'evaluation', 'datasets', 'state',
                  'init_from')
# The workdir format reads and writes the run's config.json itself.
TAKES_THE_CONFIG = {('state/workdir_files.py', 'check_config'),
                    ('state/workdir_files.py', 'write_config')}


def functions_taking_the_config(package=PACKAGE):
  """'module:function' of every function below the loop with a parameter named config that is not
  annotated as another type (the generators' dataclasses are), except from_config."""
  found = []
  for layer in BELOW_THE_LOOP:
    for directory, _, names in os.walk(os.path.join(package, layer)):
      for name in sorted(n for n in names if n.endswith('.py')):
        path = os.path.join(directory, name)
        module = os.path.relpath(path, package)
        with open(path) as f:
          tree = ast.parse(f.read())
        for node in ast.walk(tree):
          if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
          if node.name == 'from_config' or (module, node.name) in TAKES_THE_CONFIG:
            continue
          arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
          if any(a.arg == 'config' and
                 (a.annotation is None or 'ConfigDict' in ast.unparse(a.annotation))
                 for a in arguments):
            found.append(f'{module}:{node.name}')
  return found


def test_functions_below_the_loop_take_values_not_the_config():
  assert functions_taking_the_config() == []


def test_a_function_taking_the_config_below_the_loop_is_found(tmp_path):
  (tmp_path / 'state').mkdir()
  (tmp_path / 'state' / 'steps.py').write_text(
      'def from_config(config): pass\n'
      'def step(state, config): pass\n'
      'def render(config: GeneratorConfig): pass\n'
      'def evaluate(*, config: ml_collections.ConfigDict): pass\n')
  assert functions_taking_the_config(
      str(tmp_path)) == ['state/steps.py:step', 'state/steps.py:evaluate']
