"""Features mode (Cole et al.'s linear_fixed_features): train only the head on precomputed
features, --config.dataset.path=FILE.npz (hml_jax/datasets/features.py). A few thousand examples
train in seconds on a CPU."""
from hml_jax.configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = 'features'
  config.dataset.path = ''  # the .npz; required
  config.dataset.builder_config = ''
  # 'none', 'standardize' (per dimension, the training rows' mean and std, saved with the run as
  # feature_statistics.json) or 'l2' (rows to unit norm): hml_jax.training.input_pipeline.
  config.dataset.standardize = 'none'
  config.model = 'identity'  # no backbone: the head sees the features
  config.augment_max_shift = 0
  # Cole et al. train heads on fixed features for 25 epochs, the learning rate from the grid
  # {1e-2 .. 1e-5}; a lone head tolerates the grid's largest step.
  config.num_epochs = 25
  config.learning_rate = 1e-2
  config.batch_size = 32
  config.eval_batch_size = 1024
  config.log_every_steps = 50
  return config
