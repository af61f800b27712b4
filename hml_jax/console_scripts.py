"""The console commands that `pip install` puts on the PATH (pyproject.toml [project.scripts]):
each runs its tool (hml_jax/tools/) exactly as `python -m hml_jax.TOOL` does (the tool's own start-up included:
the restart with a fast malloc, its flags, one-line errors)."""
import functools
import runpy


def _as_main(module: str) -> None:
  runpy.run_module(module, run_name='__main__', alter_sys=True)


train = functools.partial(_as_main, 'hml_jax.main')  # hml-train --config=CONFIG --workdir=DIR
evaluate = functools.partial(_as_main, 'hml_jax.tools.evaluate')  # hml-eval --workdir=DIR
predict = functools.partial(_as_main,
                            'hml_jax.tools.predict')  # hml-predict --workdir=DIR IMAGE ...
analyze = functools.partial(_as_main, 'hml_jax.tools.analyze')  # hml-analyze --workdir=DIR
compare = functools.partial(_as_main,
                            'hml_jax.tools.compare')  # hml-compare --config=... --workdir=...
extract_features = functools.partial(_as_main, 'hml_jax.tools.extract_features')
