"""The second strong source of the paper's regime offline (docs/results.md, "When HML helps"):
configs/glyph_source_pretraining.py with the learning rate divided by 10 after epoch 25 (He et
al.'s step schedule, where source validation stopped improving at the constant rate), 35 epochs.
Its best epoch by source validation mAP is shipped as embedded:glyph_source_decay_resnet_small;
about half an hour on 2 cores with the dataset's generation:

  python -m hml_jax.main --config=configs/glyph_source_decay_pretraining.py \\
      --workdir=runs/regime/source_decay_pretraining
  python -m hml_jax.embedded_backbones --workdir=runs/regime/source_decay_pretraining \\
      --output=hml_jax/weights/glyph_source_decay_resnet_small.safetensors
"""
from hml_jax.configs import glyph_source_pretraining


def get_config():
  config = glyph_source_pretraining.get_config()
  config.learning_rate_decay_epochs = (25,)  # 1e-3 for epochs 1-25, 1e-4 for 26-35
  config.learning_rate_decay_factor = 0.1  # He et al. (2016), Sec. 3.4
  config.num_epochs = 35
  return config
