"""The strong source of the paper's regime offline (docs/results.md, "When HML helps"): resnet_small
pretrained with full labels and BCE on glyph_source (190 glyph classes, none a target label,
printed or drawn as 8x8 blocks like the target's digits; hml_jax/datasets/glyphs.py), as ImageNet
is to VOC. Its best epoch by source validation mAP is shipped as
embedded:glyph_source_resnet_small; about an hour on 2 cores with the dataset's generation:

  python -m hml_jax.main --config=configs/glyph_source_pretraining.py \\
      --workdir=runs/glyph_source_pretraining
  python -m hml_jax.main --config=configs/glyph_digits.py --workdir=runs/glyph_digits_strong \\
      --config.init_from=workdir:runs/glyph_source_pretraining
"""
from hml_jax.configs import glyph_pretraining


def get_config():
  config = glyph_pretraining.get_config()
  config.dataset.name = 'glyph_source'
  config.dataset.builder_config = 'default'  # 40,000 train / 2,000 test; 'tiny' for tests
  config.num_epochs = 40  # the best epoch by source validation mAP is kept (docs/results.md)
  return config
