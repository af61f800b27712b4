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
            is_module = os.path.exists(os.path.join(root, *candidate.split('.')) + '.py')
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


def test_the_step_and_the_state_import_no_weights_code():
  """The jitted step and the train state sit below every init_from source."""
  graph = import_graph()
  weights = {
      'hml_jax.init_from', 'hml_jax.pretrained', 'hml_jax.embedded_backbones', 'hml_jax.downloads',
      'hml_jax.pth_files'
  }
  for module in ('hml_jax.steps', 'hml_jax.train_state'):
    assert not graph[module] & weights, (module, graph[module] & weights)
