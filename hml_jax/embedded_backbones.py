"""`python -m hml_jax.embedded_backbones --workdir=RUN --output=FILE`: the tool is
hml_jax/tools/export_backbone.py; imported, this name is hml_jax/init_from/embedded.py (the
shipped backbones). The name stays: the shipped files' regeneration commands name it."""
from hml_jax import aliases

aliases.run_or_alias(__name__, 'hml_jax.tools.export_backbone', 'hml_jax.init_from.embedded')
