"""Every notebook runs top to bottom (tiny settings: HML_NOTEBOOK_TINY=1) without an error, and
the committed notebooks carry no outputs."""
import glob
import os
import re
import shutil

import nbformat
import pytest

# Subprocesses, fault injection, several processes or notebooks: the fast tier skips them.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(
    name for name in os.listdir(os.path.join(ROOT, 'notebooks')) if name.endswith('.ipynb'))


def tiny_run_directories(notebook):
  """The existing directories of the notebook's tiny runs: its `'runs/NAME' + ('_tiny' ...`
  workdirs, with any `{expression}` in NAME matched by a glob."""
  source = '\n'.join(cell.source for cell in notebook.cells if cell.cell_type == 'code')
  names = re.findall(r"'runs/(notebook_[^']*)' \+ \('_tiny'", source)
  assert names, 'the notebook names no tiny run: update this test'
  return [
      path for name in names
      for path in glob.glob(os.path.join(ROOT, 'runs',
                                         re.sub(r'{[^}]*}', '*', name) + '_tiny'))
      if os.path.isdir(path)
  ]


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_runs(name, tmp_path, monkeypatch):
  from nbclient import NotebookClient  # pylint: disable=g-import-not-at-top
  notebook = nbformat.read(os.path.join(ROOT, 'notebooks', name), as_version=4)
  assert all(not cell.get('outputs') and not cell.get('execution_count')
             for cell in notebook.cells
             if cell.cell_type == 'code'), 'strip the outputs'
  monkeypatch.setenv('HML_NOTEBOOK_TINY', '1')
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('MPLBACKEND', 'Agg')
  # Run from notebooks/, as Jupyter does; the setup cell moves to the repository root, and the
  # tiny runs go to runs/<name>_tiny. This notebook's runs of an earlier test session go first:
  # it would resume them (a finished run trains nothing; one of an older version is refused).
  for stale in tiny_run_directories(notebook):
    shutil.rmtree(stale)
  client = NotebookClient(notebook,
                          timeout=600,
                          kernel_name='python3',
                          resources={'metadata': {
                              'path': os.path.join(ROOT, 'notebooks')
                          }})
  client.execute()
  errors = [
      output for cell in notebook.cells for output in cell.get('outputs', [])
      if output.get('output_type') == 'error'
  ]
  assert not errors, errors
