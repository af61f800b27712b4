"""`python -m hml_jax.datasets.stats --config=...`: the tool is hml_jax/tools/dataset_stats.py."""
from hml_jax import aliases

aliases.run_or_alias(__name__, 'hml_jax.tools.dataset_stats')
