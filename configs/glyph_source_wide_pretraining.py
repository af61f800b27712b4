"""The third strong source of the paper's regime offline (docs/results.md, "When HML helps"):
configs/glyph_source_decay_pretraining.py (glyph_source, BCE, full labels, Adam 1e-3 divided by
10 after epoch 25, 35 epochs) on resnet_small_wide, resnet_small with its last two stages twice
as wide (512 features). Its best epoch by source validation mAP is shipped as
embedded:glyph_source_decay_resnet_small_wide; about 35 minutes on 2 cores with the dataset's
generation:

  python -m hml_jax.main --config=configs/glyph_source_wide_pretraining.py \\
      --workdir=runs/regime/source_wide_pretraining
  python -m hml_jax.embedded_backbones --workdir=runs/regime/source_wide_pretraining \\
      --output=hml_jax/weights/glyph_source_decay_resnet_small_wide.safetensors
"""
from hml_jax.configs import glyph_source_decay_pretraining


def get_config():
  config = glyph_source_decay_pretraining.get_config()
  config.model = 'resnet_small_wide'  # features 512 wide, twice resnet_small's
  return config
