"""torchvision weights: the committed fixture (tests/fixtures/make_torchvision_fixture.py) holds a small
torchvision Bottleneck ResNet's state dict, an input and torchvision's pooled features."""
import os
import sys

import jax
import numpy as np
import pytest

from hml_jax import init_from, models
from hml_jax.init_from import torchvision

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'torchvision_resnet_small.npz')


@pytest.fixture(scope='module')
def fixture():
  with np.load(FIXTURE, allow_pickle=False) as data:
    arrays = {name: data[name] for name in data.files}
  prefix = 'state_dict/'
  state_dict = {
      name[len(prefix):]: value for name, value in arrays.items() if name.startswith(prefix)
  }
  backbone = models.get_backbone('resnet50',
                                 stage_sizes=tuple(int(n) for n in arrays['stage_sizes']),
                                 widths=tuple(int(w) for w in arrays['widths']),
                                 stem_width=int(arrays['stem_width']))
  images = np.ascontiguousarray(arrays['images'].transpose(0, 2, 3, 1))  # NCHW -> NHWC
  return state_dict, backbone, images, arrays['features']


def test_converted_weights_give_torchvision_features(fixture):
  state_dict, backbone, images, expected = fixture
  variables = torchvision.from_torchvision(state_dict, backbone, image_shape=images.shape)
  assert set(variables) == {'params', 'batch_stats'}
  assert variables['params']['conv1']['kernel'].shape == (7, 7, 3, 8)  # HWIO
  assert set(variables['batch_stats']['layer2_0']['downsample_bn']) == {'mean', 'var'}
  assert 'fc' not in variables['params']
  features = np.asarray(jax.jit(lambda v, x: backbone.apply(v, x, train=False))(variables, images))
  assert features.shape == expected.shape == (2, 256)
  np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_conversion_without_backbone_and_default_image_shape(fixture):
  state_dict, backbone, _, _ = fixture
  unchecked = torchvision.from_torchvision(state_dict)
  checked = torchvision.from_torchvision(state_dict, backbone)
  assert jax.tree_util.tree_structure(unchecked) == jax.tree_util.tree_structure(checked)
  np.testing.assert_array_equal(unchecked['params']['layer1_0']['conv2']['kernel'],
                                state_dict['layer1.0.conv2.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(unchecked['batch_stats']['bn1']['var'],
                                state_dict['bn1.running_var'])


def test_missing_key_is_named(fixture):
  state_dict, backbone, _, _ = fixture
  state_dict = {k: v for k, v in state_dict.items() if k != 'layer3.0.downsample.1.running_mean'}
  with pytest.raises(ValueError,
                     match=r"1 missing: batch_stats/layer3_0/downsample_bn/mean "
                     r"\(torchvision 'layer3\.0\.downsample\.1\.running_mean'\) of shape \(128,\)"):
    torchvision.from_torchvision(state_dict, backbone)


def test_extra_key_is_named(fixture):
  state_dict, backbone, _, _ = fixture
  extra = {**state_dict, 'layer4.1.conv1.weight': np.zeros((64, 256, 1, 1), np.float32)}
  with pytest.raises(ValueError, match=r"unexpected.*'layer4\.1\.conv1\.weight'"):
    torchvision.from_torchvision(extra, backbone)
  unknown = {
      **state_dict, 'module.conv1.weight': state_dict['conv1.weight'],
      'layer1.0.conv1.bias': np.zeros(8, np.float32)
  }
  with pytest.raises(ValueError, match=r"\['layer1\.0\.conv1\.bias', 'module\.conv1\.weight'\]"):
    torchvision.from_torchvision(unknown)


def test_wrong_shape_is_named(fixture):
  state_dict, backbone, _, _ = fixture
  wrong = {**state_dict, 'layer2.0.conv2.weight': np.zeros((16, 16, 1, 3), np.float32)}
  with pytest.raises(ValueError,
                     match=r"'layer2\.0\.conv2\.weight' of shape \(16, 16, 1, 3\) "
                     r'gives params/layer2_0/conv2/kernel of shape \(1, 3, 16, 16\), the '
                     r'backbone expects \(3, 3, 16, 16\)'):
    torchvision.from_torchvision(wrong, backbone)


def test_imagenet_resnet50_names_fit_our_resnet50():
  """Every variable of our resnet50 has a torchvision name that maps back to it."""
  expected = torchvision.expected_variables(models.get_backbone('resnet50'), (1, 224, 224, 3))
  paths = torchvision._flatten(expected)  # pylint: disable=protected-access
  assert len(paths) == 53 * 2 + 53 * 2 + 53  # 53 convolutions and BatchNorms
  for path in paths:
    name = torchvision._torchvision_name(path)  # pylint: disable=protected-access
    assert torchvision._flax_path(name) == path, name  # pylint: disable=protected-access


def test_load_npz_and_safetensors(fixture, tmp_path):
  state_dict = fixture[0]
  path = tmp_path / 'weights.npz'
  np.savez(path, **state_dict)
  loaded = torchvision.load_state_dict(str(path))
  assert sorted(loaded) == sorted(state_dict)
  np.testing.assert_array_equal(loaded['conv1.weight'], state_dict['conv1.weight'])

  safetensors_numpy = pytest.importorskip('safetensors.numpy')
  path = tmp_path / 'weights.safetensors'
  safetensors_numpy.save_file(state_dict, str(path))
  variables = torchvision.init_variables_from(f'torchvision:{path}', fixture[1], fixture[2].shape)
  np.testing.assert_array_equal(variables['params']['bn1']['scale'], state_dict['bn1.weight'])


def test_load_errors(tmp_path):
  unknown = tmp_path / 'weights.h5'
  unknown.write_bytes(b'')
  with pytest.raises(ValueError, match=r"weights\.h5.*\.safetensors, \.npz, \.pth, \.pt"):
    torchvision.load_state_dict(str(unknown))
  with pytest.raises(FileNotFoundError, match='absent.safetensors'):
    torchvision.load_state_dict(str(tmp_path / 'absent.safetensors'))
  with pytest.raises(ValueError, match="'imagenet:.*torchvision:"):
    torchvision.init_variables_from('imagenet:/x.pth', models.get_backbone('resnet50'),
                                    (1, 224, 224, 3))


def test_pth_is_read_without_torch(fixture, monkeypatch):
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` would now raise ImportError
  loaded = torchvision.load_state_dict(
      os.path.join(os.path.dirname(FIXTURE), 'torchvision_resnet_small.pth'))
  np.testing.assert_array_equal(loaded['layer4.0.conv3.weight'],
                                fixture[0]['layer4.0.conv3.weight'])


def test_pth_with_torch(fixture, tmp_path):
  torch = pytest.importorskip('torch')
  path = tmp_path / 'weights.pth'
  torch.save({name: torch.from_numpy(value) for name, value in fixture[0].items()}, path)
  loaded = torchvision.load_state_dict(str(path))
  np.testing.assert_array_equal(loaded['layer4.0.conv3.weight'],
                                fixture[0]['layer4.0.conv3.weight'])


@pytest.mark.slow
def test_train_state_starts_from_the_pretrained_backbone(fixture, tmp_path):
  """config.init_from puts the converted weights into the model's backbone; the head is fresh and
  the classifier's features equal torchvision's."""
  from hml_jax.configs import paper  # pylint: disable=g-import-not-at-top
  from hml_jax.models import heads  # pylint: disable=g-import-not-at-top
  from hml_jax import methods
  from hml_jax.state import train_state
  state_dict, backbone, images, expected = fixture
  path = tmp_path / 'weights.npz'
  np.savez(path, **state_dict)
  config = paper.get_config('hml_voc2012')
  config.init_from = f'torchvision:{path}'
  model = models.MultiLabelClassifier(backbone=backbone, head=heads.get_head('cosine', 5))
  state = train_state.create_train_state(train_state.StateSettings.from_config(config),
                                         model,
                                         methods.get_method('hml'),
                                         jax.random.key(0),
                                         images.shape[1:],
                                         backbone=init_from.initial_backbone(
                                             config.init_from, config.model, model,
                                             images.shape[1:]))
  features = backbone.apply(
      {
          'params': state.params['model']['backbone'],
          'batch_stats': state.batch_stats['backbone']
      },
      images,
      train=False)
  np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
  assert state.params['model']['head']['label_embeddings'].shape == (256, 5)
  with pytest.raises(ValueError, match='torchvision:'):
    init_from.load('imagenet:/somewhere', model, images.shape[1:])
