import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hml_jax import models

# torchvision's parameter counts without the fc layer (resnet50: 25,557,032 - 2048*1000 - 1000).
TORCHVISION_BACKBONE_PARAMS = {
    'resnet18': 11_689_512 - 512 * 1000 - 1000,
    'resnet34': 21_797_672 - 512 * 1000 - 1000,
    'resnet50': 25_557_032 - 2048 * 1000 - 1000,
    'resnet101': 44_549_160 - 2048 * 1000 - 1000,
}


@pytest.mark.parametrize('name', sorted(TORCHVISION_BACKBONE_PARAMS))
def test_resnet_shapes_and_parameter_counts_match_torchvision(name):
  backbone = models.get_backbone(name)
  images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: backbone.init(jax.random.key(0), x), images)
  count = sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(variables['params']))
  assert count == TORCHVISION_BACKBONE_PARAMS[name]
  features = jax.eval_shape(lambda v, x: backbone.apply(v, x), variables, images)
  assert features.shape == (2, 2048 if name in ('resnet50', 'resnet101') else 512)


def test_resnet50_uses_torchvision_names():
  variables = jax.eval_shape(lambda x: models.get_backbone('resnet50').init(jax.random.key(0), x),
                             jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  params = variables['params']
  assert params['conv1']['kernel'].shape == (7, 7, 3, 64)
  block = params['layer2_0']
  assert set(block) == {
      'conv1', 'bn1', 'conv2', 'bn2', 'conv3', 'bn3', 'downsample_conv', 'downsample_bn'
  }
  assert block['conv2']['kernel'].shape == (3, 3, 128, 128)  # stride on the 3x3 conv (v1.5)
  assert 'layer4_2' in params and 'layer4_3' not in params
  assert set(variables['batch_stats']['bn1']) == {'mean', 'var'}


def test_unknown_model_is_named():
  with pytest.raises(ValueError, match="'resnet5'.*config.model"):
    models.get_backbone('resnet5')


def test_classifier_outputs_cosines_or_logits():
  images = jnp.ones((2, 16, 16, 3))
  for head, check in (('cosine', lambda y: np.all(np.abs(y) <= 1)), ('linear', lambda y: True)):
    model = models.create_model('resnet_tiny', head, num_labels=5)
    variables = model.init(jax.random.key(0), images)
    outputs, updates = model.apply(variables, images, train=True, mutable=['batch_stats'])
    assert outputs.shape == (2, 5) and outputs.dtype == jnp.float32 and check(outputs)
    assert 'batch_stats' in updates


def test_half_precision_backbone_keeps_float32_parameters_and_cosines():
  model = models.create_model('resnet_tiny', 'cosine', num_labels=3, dtype=jnp.bfloat16)
  images = jnp.ones((2, 16, 16, 1))
  variables = model.init(jax.random.key(0), images)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables['params']))
  outputs = model.apply(variables, images)
  assert outputs.dtype == jnp.float32 and outputs.shape == (2, 3)
