"""`python -m hml_jax.evaluate`: the tool is hml_jax/tools/evaluate.py (this name is kept for it)."""
from hml_jax import aliases

aliases.run_or_alias(__name__, 'hml_jax.tools.evaluate')
