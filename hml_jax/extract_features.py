"""`python -m hml_jax.extract_features`: the tool is hml_jax/tools/extract_features.py; imported,
this name is hml_jax/training/extract_features.py (the functions the tool calls)."""
from hml_jax import aliases

aliases.run_or_alias(__name__, 'hml_jax.tools.extract_features',
                     'hml_jax.training.extract_features')
