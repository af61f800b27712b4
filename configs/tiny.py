"""A seconds-long run for tests and smoke checks: 32x32 composites, a tiny ResNet, 2 epochs."""
from hml_jax.configs import default


def get_config():
  config = default.get_config()
  config.dataset.builder_config = 'tiny'
  config.image_size = 32
  config.model = 'resnet_tiny'
  config.batch_size = 16
  config.eval_batch_size = 64
  config.num_epochs = 2
  config.log_every_steps = 4
  return config
