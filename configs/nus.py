"""NUS-WIDE, 81 concepts, Cole et al.'s re-crawled subset (hml_jax/datasets/nus_wide.py).
Paper Table 1: 150,000 / 60,260 images."""
from hml_jax.configs import paper


def get_config():
  config = paper.get_config('hml_nus_wide')
  config.batch_size = 16  # Zhou et al.'s NUS-WIDE choice from the grid {8, 16}
  config.expected_num_pos = 1.9  # epr / role: Cole et al., train.py
  config.alpha, config.beta, config.warmup_epoch = 0.1, 0.2, 4  # em / em_apl: Zhou et al.
  # ll_*: Kim et al.'s per-dataset delta_rel, authors' reply in LargeLossMatters issue #4.
  config.delta_rel_by_method = {'ll_r': 0.4, 'll_ct': 0.2, 'll_cp': 0.2}
  return config
