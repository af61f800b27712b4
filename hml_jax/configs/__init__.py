"""The configs, importable as hml_jax.configs.NAME from a checkout and from an installed package
alike. In a checkout they live in the repository's top-level configs/ (where the commands name
them: --config=configs/coco.py), and this package reads them there; `pip install` puts that
folder itself here (pyproject.toml maps hml_jax.configs to configs/), so nothing of hml_jax takes
the top-level name `configs`."""
import os

__path__ = [  # pylint: disable=redefined-builtin
    os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                 'configs')
]
