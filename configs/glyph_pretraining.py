"""The pretraining stage of the paper's regime offline (docs/results.md, "The paper's regime"):
the source task glyph_pretraining (hml_jax/datasets/glyphs.py), as ImageNet is to VOC, with full
labels and plain BCE. Its best checkpoint's backbone starts every configs/glyph_digits.py run
(config.init_from='workdir:runs/glyph_pretraining')."""
from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = 'glyph_pretraining'
  config.dataset.builder_config = 'default'  # 'tiny' for tests
  config.loss = 'bce'  # full labels: BCE, as ImageNet pretraining's cross-entropy
  config.label_scenario = 'full'
  config.model = 'resnet_small'
  config.image_size = 32  # the generated images' size (hml_jax/datasets/glyphs.py)
  config.num_epochs = 24  # the best epoch by source validation mAP is kept (docs/results.md)
  return config
