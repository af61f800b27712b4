"""hml_jax: Hyperspherical Learning in Multi-Label Classification (Ke et al., ECCV 2022) in JAX."""
