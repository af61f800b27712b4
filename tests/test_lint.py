"""The lint of pyproject.toml's [tool.ruff] (pyflakes errors, syntax, the style's rules) and the
format of its [tool.yapf] (Google's style, 2-space indents, 100 columns) hold everywhere: CI runs
them through the README's test command. `yapf -i -r hml_jax configs scripts tests benchmarks`
fixes the format."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_finds_nothing():
  ruff = shutil.which('ruff') or os.path.join(os.path.dirname(sys.executable), 'ruff')
  result = subprocess.run([ruff, 'check', '--output-format=concise', ROOT],
                          capture_output=True,
                          text=True,
                          check=False,
                          cwd=ROOT)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_code_is_formatted():
  result = subprocess.run([
      sys.executable, '-m', 'yapf', '--diff', '--recursive', '--parallel', 'hml_jax', 'configs',
      'scripts', 'tests', 'benchmarks'
  ],
                          capture_output=True,
                          text=True,
                          check=False,
                          cwd=ROOT)
  assert result.returncode == 0 and not result.stdout, result.stdout[:5000] + result.stderr
