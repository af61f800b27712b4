"""Makes tests/fixtures/torchvision_resnet_small.npz from torchvision, and checks ResNet-50.

Needs torch and torchvision, which are NOT requirements of this project (install them in a
separate environment, e.g. python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch
torchvision --index-url https://download.pytorch.org/whl/cpu, plus jax, flax and numpy), and runs
from the repository root:

  PYTHONPATH=. python scripts/make_torchvision_fixture.py             # writes the fixture
  PYTHONPATH=. python scripts/make_torchvision_fixture.py --resnet50  # prints differences only

Default mode: a small torchvision ResNet built by torchvision's own ResNet class and _make_layer
(Bottleneck blocks, one per stage, stage widths WIDTHS, stem width STEM_WIDTH), seeded random
init with randomized BatchNorm affine parameters and running statistics (so that eval mode is
not the identity), in eval mode, fc replaced by Identity. The fixture holds its state dict
('state_dict/<torchvision name>', float32; num_batches_tracked int64), a fixed input 'images'
(N, C, H, W) float32, torchvision's pooled features 'features' (N, 4 * WIDTHS[-1]), and the
matching get_backbone('resnet50', stage_sizes=..., widths=..., stem_width=...) overrides.

--resnet50: torchvision's full-size resnet50 (random init, randomized BatchNorm statistics),
converted with hml_jax.pretrained.from_torchvision, both networks on the same random
1x3x224x224 input; prints the max absolute and relative differences of the pooled features.
Nothing is saved.
"""
import argparse
import os

import numpy as np
import torch
from torch import nn
import torchvision
from torchvision.models import resnet as tv_resnet

SEED = 0
STAGE_SIZES = (1, 1, 1, 1)
WIDTHS = (8, 16, 32, 64)
STEM_WIDTH = 8
IMAGE_SHAPE = (2, 3, 64, 64)  # NCHW
OUTPUT = os.path.join('tests', 'fixtures', 'torchvision_resnet_small.npz')


def small_torchvision_resnet() -> tv_resnet.ResNet:
  """torchvision's ResNet with narrower stem and stages (its constructor fixes 64..512)."""
  model = tv_resnet.ResNet(tv_resnet.Bottleneck, list(STAGE_SIZES))
  model.inplanes = STEM_WIDTH
  model.conv1 = nn.Conv2d(3, STEM_WIDTH, kernel_size=7, stride=2, padding=3, bias=False)
  model.bn1 = nn.BatchNorm2d(STEM_WIDTH)
  for stage, (num_blocks, width) in enumerate(zip(STAGE_SIZES, WIDTHS)):
    layer = model._make_layer(  # pylint: disable=protected-access
        tv_resnet.Bottleneck,
        width,
        num_blocks,
        stride=1 if stage == 0 else 2)
    setattr(model, f'layer{stage + 1}', layer)
  # A small fc (its entries are in the state dict, which from_torchvision must drop).
  model.fc = nn.Linear(tv_resnet.Bottleneck.expansion * WIDTHS[-1], 3)
  for module in model.modules():  # torchvision's init, as in its constructor
    if isinstance(module, nn.Conv2d):
      nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
  return model


def randomize_batch_norms(model: nn.Module, generator: torch.Generator) -> None:
  for module in model.modules():
    if isinstance(module, nn.BatchNorm2d):
      shape = module.weight.shape
      with torch.no_grad():
        module.weight.copy_(torch.empty(shape).uniform_(0.5, 1.5, generator=generator))
        module.bias.copy_(0.1 * torch.randn(shape, generator=generator))
        module.running_mean.copy_(0.1 * torch.randn(shape, generator=generator))
        module.running_var.copy_(torch.empty(shape).uniform_(0.5, 2.0, generator=generator))
        module.num_batches_tracked.fill_(int(torch.randint(1, 1000, (), generator=generator)))


def torchvision_features(model: tv_resnet.ResNet, images: np.ndarray) -> np.ndarray:
  model.fc = nn.Identity()
  model.eval()
  with torch.no_grad():
    return model(torch.from_numpy(images)).numpy()


def state_dict_numpy(model: nn.Module) -> dict:
  return {name: value.detach().numpy().copy() for name, value in model.state_dict().items()}


def flax_features(state_dict: dict, images_nchw: np.ndarray, **overrides) -> np.ndarray:
  from hml_jax import models, pretrained  # pylint: disable=g-import-not-at-top
  backbone = models.get_backbone('resnet50', **overrides)
  images = np.ascontiguousarray(images_nchw.transpose(0, 2, 3, 1))  # NCHW -> NHWC
  variables = pretrained.from_torchvision(state_dict, backbone, image_shape=images.shape)
  return np.asarray(backbone.apply(variables, images, train=False))


def report(name: str, expected: np.ndarray, actual: np.ndarray) -> None:
  difference = np.abs(expected - actual)
  print(f'{name}: features {expected.shape}, max |torchvision| {np.abs(expected).max():.4g}, '
        f'max abs difference {difference.max():.3g}, max relative difference '
        f'{difference.max() / np.abs(expected).max():.3g} (to the max |feature|), max elementwise '
        f'relative difference {(difference / np.maximum(np.abs(expected), 1e-6)).max():.3g}')


def make_fixture(output: str) -> None:
  generator = torch.Generator().manual_seed(SEED)
  torch.manual_seed(SEED)
  model = small_torchvision_resnet()
  randomize_batch_norms(model, generator)
  images = torch.randn(IMAGE_SHAPE, generator=generator).numpy()
  state_dict = state_dict_numpy(model)
  features = torchvision_features(model, images)
  os.makedirs(os.path.dirname(output), exist_ok=True)
  np.savez_compressed(output,
                      images=images,
                      features=features,
                      stage_sizes=np.array(STAGE_SIZES),
                      widths=np.array(WIDTHS),
                      stem_width=np.array(STEM_WIDTH),
                      **{
                          f'state_dict/{name}': value for name, value in state_dict.items()
                      })
  print(f'Wrote {output} ({os.path.getsize(output)} bytes, torchvision {torchvision.__version__},'
        f' {len(state_dict)} state-dict entries, features {features.shape})')
  report(
      'small ResNet', features,
      flax_features(state_dict,
                    images,
                    stage_sizes=STAGE_SIZES,
                    widths=WIDTHS,
                    stem_width=STEM_WIDTH))


def check_resnet50() -> None:
  generator = torch.Generator().manual_seed(SEED)
  torch.manual_seed(SEED)
  model = torchvision.models.resnet50()
  randomize_batch_norms(model, generator)
  images = torch.randn((1, 3, 224, 224), generator=generator).numpy()
  state_dict = state_dict_numpy(model)
  report('resnet50', torchvision_features(model, images), flax_features(state_dict, images))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--resnet50',
                      action='store_true',
                      help='compare a full-size random resnet50 instead; saves nothing')
  parser.add_argument('--output', default=OUTPUT)
  args = parser.parse_args()
  torch.set_num_threads(1)
  if args.resnet50:
    check_resnet50()
  else:
    make_fixture(args.output)


if __name__ == '__main__':
  main()
