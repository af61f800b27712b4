"""MS-COCO 2014 (80 labels) with the paper's protocol: train2014 -> train + validation,
val2014 -> test (hml_jax/datasets/coco2014.py). Paper Table 1: 82,081 / 40,137 images."""
from hml_jax.configs import paper


def get_config():
  config = paper.get_config('hml_coco2014')
  config.batch_size = 16  # Zhou et al.'s COCO choice from the grid {8, 16}
  config.expected_num_pos = 2.9  # epr / role: Cole et al., train.py
  config.alpha, config.beta, config.warmup_epoch = 0.1, 0.9, 5  # em / em_apl: Zhou et al.
  # ll_*: Kim et al.'s per-dataset delta_rel, authors' reply in LargeLossMatters issue #4.
  config.delta_rel_by_method = {'ll_r': 0.4, 'll_ct': 0.2, 'll_cp': 0.2}
  return config
