"""The lint of pyproject.toml's [tool.ruff] (pyflakes errors, syntax, the style's rules) holds
everywhere: CI runs it through the README's test command."""
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_finds_nothing():
  ruff = shutil.which('ruff') or os.path.join(os.path.dirname(sys.executable), 'ruff')
  result = subprocess.run([ruff, 'check', '--output-format=concise', ROOT], capture_output=True,
                          text=True, check=False, cwd=ROOT)
  assert result.returncode == 0, result.stdout + result.stderr
