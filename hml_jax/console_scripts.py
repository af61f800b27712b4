"""The console commands that `pip install` puts on the PATH (pyproject.toml [project.scripts]):
each runs its tool exactly as `python -m hml_jax.TOOL` does (the tool's own start-up included:
the restart with a fast malloc, its flags, one-line errors)."""
import runpy


def _as_main(module: str) -> None:
  runpy.run_module(module, run_name='__main__', alter_sys=True)


def train() -> None:
  """hml-train --config=CONFIG --workdir=DIR (python -m hml_jax.main)."""
  _as_main('hml_jax.main')


def evaluate() -> None:
  """hml-eval --workdir=DIR [--split=test]."""
  _as_main('hml_jax.evaluate')


def predict() -> None:
  """hml-predict --workdir=DIR IMAGE_OR_FOLDER ..."""
  _as_main('hml_jax.predict')


def analyze() -> None:
  """hml-analyze --workdir=DIR."""
  _as_main('hml_jax.analyze')


def compare() -> None:
  """hml-compare --config=CONFIG --workdir=DIR --methods=hml,an ..."""
  _as_main('hml_jax.compare')


def extract_features() -> None:
  """hml-extract-features --config=CONFIG --output=FILE.npz."""
  _as_main('hml_jax.extract_features')
