"""The command-line tools (python -m hml_jax.NAME) and their shared start-up (cli.py)."""
