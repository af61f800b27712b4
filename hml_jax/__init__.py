"""hml_jax: Hyperspherical Learning in Multi-Label Classification (Ke et al., ECCV 2022) in JAX.

The subpackages, bottom layer first (each imports only from those before it; docs/development.md,
"Code tour"): runtime, models, data, methods, evaluation, datasets, state, init_from, training,
tools; then main.py, the training command.
"""
from hml_jax import aliases

aliases.install()
