"""The package's import graph has no circle: every `from hml_jax... import` counts, those inside
functions too (a lazy import that closes a circle is a design knot all the same)."""
import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'hml_jax')


def import_graph():
  """{module: {modules of hml_jax it imports}} over every .py file of the package."""
  root = os.path.dirname(PACKAGE)
  graph = {}
  for directory, _, names in os.walk(PACKAGE):
    for name in names:
      if not name.endswith('.py'):
        continue
      path = os.path.join(directory, name)
      module = os.path.relpath(path, root)[:-3].replace(os.sep, '.')
      module = module[:-len('.__init__')] if module.endswith('.__init__') else module
      with open(path) as f:
        tree = ast.parse(f.read())
      imported = set()
      for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('hml_jax'):
          for alias in node.names:
            candidate = f'{node.module}.{alias.name}'
            path = os.path.join(root, *candidate.split('.'))
            is_module = os.path.exists(path + '.py') or os.path.exists(
                os.path.join(path, '__init__.py'))
            imported.add(candidate if is_module else node.module)
        elif isinstance(node, ast.Import):
          imported.update(a.name for a in node.names if a.name.startswith('hml_jax.'))
      imported.discard(module)
      graph[module] = imported
  return graph


def find_circle(graph):
  """One circle as a list of modules, or None (depth-first search with colours)."""
  state, stack = {}, []

  def visit(module):
    state[module] = 'open'
    stack.append(module)
    for other in sorted(graph.get(module, ())):
      if other not in graph:
        continue
      if state.get(other) == 'open':
        return stack[stack.index(other):] + [other]
      if other not in state:
        found = visit(other)
        if found:
          return found
    state[module] = 'done'
    stack.pop()
    return None

  for module in sorted(graph):
    if module not in state:
      found = visit(module)
      if found:
        return found
  return None


def test_the_import_graph_has_no_circle():
  circle = find_circle(import_graph())
  assert circle is None, ' -> '.join(circle)


def test_the_circle_finder_finds_a_circle():
  assert find_circle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_circle({'a': {'b'}, 'b': set()}) is None


# The layers, bottom first: a module imports only from its own layer and those before it
# (docs/development.md, "Code tour"). The package's face (hml_jax/__init__.py, aliases.py), the
# tools' old names (hml_jax/predict.py, ...) and main.py stand above all.
LAYERS = ('runtime', 'models', 'data', 'methods', 'evaluation', 'datasets', 'state', 'init_from',
          'training', 'tools')
TOP = ('hml_jax', 'hml_jax.aliases', 'hml_jax.main', 'hml_jax.console_scripts', 'hml_jax.predict',
       'hml_jax.evaluate', 'hml_jax.analyze', 'hml_jax.compare', 'hml_jax.benchmark',
       'hml_jax.extract_features', 'hml_jax.embedded_backbones', 'hml_jax.datasets.stats')


def layer_of(module):
  """The index in LAYERS of a module's subpackage; len(LAYERS) for the top; None for configs."""
  if module in TOP:
    return len(LAYERS)
  package = module.split('.')[1]
  if package == 'configs':
    return None
  assert package in LAYERS, f'{module} is in no layer: add its subpackage to LAYERS'
  return LAYERS.index(package)


def upward_imports(graph):
  return sorted((module, other)
                for module, imported in graph.items()
                for other in imported
                if layer_of(module) is not None and layer_of(other) is not None and
                layer_of(other) > layer_of(module))


def test_every_import_runs_down_the_layers():
  assert upward_imports(import_graph()) == []


def test_an_upward_import_is_found():
  assert upward_imports({'hml_jax.models.heads': {'hml_jax.state.steps'}
                        }) == [('hml_jax.models.heads', 'hml_jax.state.steps')]


def test_the_top_level_holds_only_the_face_the_tools_old_names_and_main():
  top = {name[:-3] for name in os.listdir(PACKAGE) if name.endswith('.py')}
  assert {f'hml_jax.{name}' for name in top
         } == set(TOP) - {'hml_jax', 'hml_jax.datasets.stats'} | {'hml_jax.__init__'}


def test_the_old_names_are_the_same_modules():
  """`from hml_jax import heads` (the flat layout's names) gives the module itself."""
  import importlib  # pylint: disable=g-import-not-at-top
  from hml_jax import aliases  # pylint: disable=g-import-not-at-top
  for old, new in aliases.LIBRARY.items():
    assert importlib.import_module(f'hml_jax.{old}') is importlib.import_module(f'hml_jax.{new}')
  from hml_jax import embedded_backbones, extract_features, predict  # pylint: disable=g-import-not-at-top
  from hml_jax.init_from import embedded  # pylint: disable=g-import-not-at-top
  from hml_jax.tools import predict as predict_tool  # pylint: disable=g-import-not-at-top
  from hml_jax.training import extract_features as features_library  # pylint: disable=g-import-not-at-top
  assert embedded_backbones is embedded and predict is predict_tool
  assert extract_features is features_library


def test_the_step_and_the_state_import_no_weights_code():
  """The jitted step and the train state sit below every init_from source."""
  graph = import_graph()
  weights = {m for m in graph if m.startswith('hml_jax.init_from')} | {'hml_jax.runtime.downloads'}
  for module in ('hml_jax.state.steps', 'hml_jax.state.train_state'):
    assert not graph[module] & weights, (module, graph[module] & weights)


def test_the_step_imports_no_state_creation():
  """state/steps.py needs the state's type and settings (state/settings.py), not how a state is
  made or restored (state/train_state.py, checkpoints)."""
  graph = import_graph()
  creation = {'hml_jax.state.train_state', 'hml_jax.state.checkpoints', 'hml_jax.models'}
  assert not graph['hml_jax.state.steps'] & creation, graph['hml_jax.state.steps'] & creation
  assert not graph['hml_jax.state.settings'] & creation
