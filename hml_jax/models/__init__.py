"""ResNet backbones that mirror torchvision's ResNet layer by layer, and the full model.

Module names follow torchvision's state-dict names (conv1, bn1, layer1_0/conv1, .../downsample_conv,
.../downsample_bn), so that ImageNet weights can be imported tensor by tensor. As in torchvision:
bias-free convolutions with explicit symmetric padding, BatchNorm with eps 1e-5 and momentum 0.1
(Flax's momentum is the complement, 0.9), stride on the 3x3 convolution of a bottleneck ("ResNet
v1.5"), max-pool 3x3/2 with padding 1, global average pooling. A backbone maps images
(batch, height, width, channels) to pooled features (batch, feature_dim); inside, activations are
in the layout of the convolutions' implementation (layers.channel_axis: channel-major for
'matmul', which is what makes the CPU's matmuls fast, channel-last for 'native').
"""
import functools
from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from hml_jax.models import heads as heads_lib
from hml_jax.models import initializers
from hml_jax.models import layers
from hml_jax.runtime import errors

# torchvision's init: kaiming_normal_(mode='fan_out', nonlinearity='relu') for convolutions.
conv_init = initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _pad(size: int):
  return ((size // 2, size // 2),) * 2


def _add_shortcut(block, x, y, features: int):
  """relu(y + shortcut(x)) inside a block's __call__, y with `features` channels; the shortcut is
  torchvision's downsample (strided 1x1 convolution + BatchNorm) where the block changes the
  shape, else the identity."""
  if x.shape != y.shape:
    x = block.conv(features, (1, 1), (block.strides,) * 2, padding='VALID',
                   name='downsample_conv')(x)
    x = block.norm(name='downsample_bn')(x)
  return nn.relu(y + x)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions (ResNet-18/34). Output channels = width."""
  width: int
  strides: int = 1
  conv: Any = None
  norm: Any = None

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.width, (3, 3), (self.strides,) * 2, padding=_pad(3), name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.width, (3, 3), padding=_pad(3), name='conv2')(y)
    return _add_shortcut(self, x, self.norm(name='bn2')(y), self.width)


class Bottleneck(nn.Module):
  """1x1, 3x3 (strided), 1x1 convolutions (ResNet-50/101). Output channels = 4 * width."""
  width: int
  strides: int = 1
  conv: Any = None
  norm: Any = None

  @nn.compact
  def __call__(self, x):
    y = nn.relu(self.norm(name='bn1')(self.conv(self.width, (1, 1), name='conv1')(x)))
    y = self.conv(self.width, (3, 3), (self.strides,) * 2, padding=_pad(3), name='conv2')(y)
    y = nn.relu(self.norm(name='bn2')(y))
    y = self.norm(name='bn3')(self.conv(self.width * 4, (1, 1), name='conv3')(y))
    return _add_shortcut(self, x, y, self.width * 4)


class ResNet(nn.Module):
  """torchvision's ResNet without its fc layer: images (N, H, W, C) -> features (N, final width).

  small_inputs replaces the 7x7/2 stem and the max-pool by one 3x3 convolution of stride
  small_stem_strides (as ResNets for CIFAR-sized images do), so that 32-64 pixel images are not
  downsampled 4x before the first stage. convolutions chooses how the convolutions are computed
  (hml_jax/models/layers.py: 'auto', 'native' or 'matmul'); the parameters are the same.
  """
  stage_sizes: Sequence[int]
  block: Any
  widths: Tuple[int, ...] = (64, 128, 256, 512)
  stem_width: int = 64
  small_inputs: bool = False
  small_stem_strides: int = 1
  dtype: Any = jnp.float32
  convolutions: str = 'auto'

  @nn.compact
  def __call__(self, images, train: bool = False):
    conv = functools.partial(layers.Conv,
                             use_bias=False,
                             dtype=self.dtype,
                             kernel_init=conv_init,
                             convolutions=self.convolutions)
    # Activations are in the layout of the convolutions' implementation (layers.channel_axis).
    norm = functools.partial(layers.BatchNorm,
                             use_running_average=not train,
                             momentum=0.9,
                             epsilon=1e-5,
                             dtype=self.dtype,
                             axis=layers.channel_axis(self.convolutions))
    x = layers.from_images(images.astype(self.dtype), self.convolutions)
    if self.small_inputs:
      x = conv(self.stem_width, (3, 3), (self.small_stem_strides,) * 2,
               padding=_pad(3),
               name='conv1')(x)
      x = nn.relu(norm(name='bn1')(x))
    else:
      x = conv(self.stem_width, (7, 7), (2, 2), padding=_pad(7), name='conv1')(x)
      x = nn.relu(norm(name='bn1')(x))
      x = layers.max_pool(x, 3, 2, 1, self.convolutions)
    for stage, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for index in range(num_blocks):
        strides = 2 if stage > 0 and index == 0 else 1
        x = self.block(width, strides, conv=conv, norm=norm, name=f'layer{stage + 1}_{index}')(x)
    return layers.global_average(x, self.convolutions).astype(jnp.float32)


class Identity(nn.Module):
  """No backbone (features mode): the inputs are already features, (N, D) float32."""
  dtype: Any = jnp.float32
  convolutions: str = 'auto'  # accepted for a uniform interface; there are none

  @nn.compact
  def __call__(self, features, train: bool = False):
    del train
    return features.astype(jnp.float32)


BACKBONES = {
    'identity':
        Identity,
    'resnet18':
        functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock),
    'resnet34':
        functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=BasicBlock),
    'resnet50':
        functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=Bottleneck),
    'resnet101':
        functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block=Bottleneck),
    # The embedded default dataset's model: ResNet-10-like, narrow, for 32-64 pixel images (one
    # 3x3/2 stem convolution: 48x48 images enter the first stage at 24x24).
    'resnet_small':
        functools.partial(ResNet,
                          stage_sizes=(1, 1, 1, 1),
                          block=BasicBlock,
                          widths=(32, 64, 128, 256),
                          stem_width=32,
                          small_inputs=True,
                          small_stem_strides=2),
    # resnet_small with its last two stages twice as wide (512 features, 1.7x the step time on
    # 32x32 images): the third strong source of docs/results.md, "When HML helps".
    'resnet_small_wide':
        functools.partial(ResNet,
                          stage_sizes=(1, 1, 1, 1),
                          block=BasicBlock,
                          widths=(32, 64, 256, 512),
                          stem_width=32,
                          small_inputs=True,
                          small_stem_strides=2),
    # For tests only: the smallest network with every kind of layer.
    'resnet_tiny':
        functools.partial(ResNet,
                          stage_sizes=(1, 1),
                          block=BasicBlock,
                          widths=(8, 16),
                          stem_width=8,
                          small_inputs=True),
}


def get_backbone(name: str, **overrides) -> nn.Module:
  if name not in BACKBONES:
    raise errors.InvalidInputError(
        f'Unknown model {name!r} (config.model); choose one of {sorted(BACKBONES)}.')
  return BACKBONES[name](**overrides)


class MultiLabelClassifier(nn.Module):
  """Backbone + head. Returns cosines (cosine head) or logits (linear head), (N, num_labels)."""
  backbone: nn.Module
  head: nn.Module

  def __call__(self, images, train: bool = False):
    return self.head(self.backbone(images, train=train))


def create_model(model_name: str,
                 head_kind: str,
                 num_labels: int,
                 dtype=jnp.float32,
                 convolutions: str = 'auto'):
  return MultiLabelClassifier(backbone=get_backbone(model_name,
                                                    dtype=dtype,
                                                    convolutions=convolutions),
                              head=heads_lib.get_head(head_kind, num_labels))
