"""`python -m hml_jax.compare`: the tool is hml_jax/tools/compare.py (this name is kept for it)."""
from hml_jax import aliases

aliases.run_or_alias(__name__, 'hml_jax.tools.compare')
