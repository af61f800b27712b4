"""The PyTorch side of hml_jax.benchmark: the same model and step, the same JSON keys.

  python benchmarks/torch_reference.py [--model=resnet50] [--image_size=224] [--batch_size=16]
      [--steps=20] [--threads=N] [--channels_last] [--bf16] [--compile]

torch and torchvision are NOT requirements of hml_jax: install them in another environment.
The step: torchvision's ResNet (random init, train mode), the cosine head with label embeddings,
p = sigmoid(s cos(arccos(c) + m)) with the margin on every label (c cos m - sqrt(1 - c^2) sin m,
as hml_jax computes it), BCE averaged over batch x labels plus the adaptive term of Eq. 6 on
learnable s, m (their own Adam), Adam on the network. uint8 images are normalized inside the step,
as in hml_jax. Options give PyTorch's fast paths on a GPU: channels_last, bfloat16 autocast,
torch.compile. Run both frameworks on the same machine in the same hour.
"""
import argparse
import json
import resource
import time

import torch
from torch import nn
import torchvision


class CosineClassifier(nn.Module):
  """Backbone + label embeddings on the hypersphere; returns cosines (batch, labels)."""

  def __init__(self, model_name, num_labels):
    super().__init__()
    self.backbone = getattr(torchvision.models, model_name)()
    dimension = self.backbone.fc.in_features
    self.backbone.fc = nn.Identity()
    self.embeddings = nn.Parameter(torch.randn(num_labels, dimension) * dimension**-0.5)
    self.register_buffer('mean', torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255)
    self.register_buffer('std', torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255)

  def forward(self, images):
    features = self.backbone((images.float() - self.mean) / self.std)
    return nn.functional.normalize(features.float(), dim=1) @ nn.functional.normalize(
        self.embeddings, dim=1).t()


def memory_allocator():
  """'tcmalloc', 'jemalloc', 'tbbmalloc' or 'system' (as hml_jax.runtime.allocator.memory_allocator,
  without importing hml_jax): compare both frameworks with the same one."""
  try:
    with open('/proc/self/maps') as f:
      maps = f.read()
  except OSError:
    return 'system'
  return next((name for library, name in (('libtcmalloc', 'tcmalloc'), ('libjemalloc', 'jemalloc'),
                                          ('libtbbmalloc_proxy', 'tbbmalloc')) if library in maps),
              'system')


def margin_logits(cos, scale, margin):
  cos = cos.clamp(-1.0, 1.0)
  return scale * (cos * torch.cos(margin) - torch.sqrt(
      (1.0 - cos * cos).clamp_min(1e-12)) * torch.sin(margin))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model', default='resnet50')
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--num_labels', type=int, default=20)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--threads', type=int, default=0, help='torch.set_num_threads (0: default)')
  parser.add_argument('--channels_last', action='store_true')
  parser.add_argument('--bf16', action='store_true', help='bfloat16 autocast')
  parser.add_argument('--compile', action='store_true', help='torch.compile the step')
  args = parser.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  # PyTorch's own advice for fixed shapes: let cuDNN time its convolution algorithms (XLA autotunes
  # its convolutions too), and Adam as one fused kernel.
  torch.backends.cudnn.benchmark = device.type == 'cuda'
  fused = device.type == 'cuda'
  torch.manual_seed(0)
  model = CosineClassifier(args.model, args.num_labels).to(device)
  memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
  model = model.to(memory_format=memory_format)
  scale = nn.Parameter(torch.tensor(20.0, device=device))
  margin = nn.Parameter(torch.tensor(0.3, device=device))
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-5, fused=fused)
  adaptive_optimizer = torch.optim.Adam([scale, margin], lr=1e-3, fused=fused)
  images = torch.randint(0,
                         256, (args.batch_size, 3, args.image_size, args.image_size),
                         dtype=torch.uint8,
                         device=device).contiguous(memory_format=memory_format)
  labels = torch.zeros(args.batch_size, args.num_labels, device=device)
  labels[torch.arange(args.batch_size), torch.randint(0, args.num_labels, (args.batch_size,))] = 1

  def step():
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
      cos = model(images)
    cos = cos.float()
    logits = margin_logits(cos, scale.detach(), margin.detach())
    bce = nn.functional.binary_cross_entropy_with_logits(logits, labels)
    p = torch.sigmoid(margin_logits(cos.detach(), scale, margin))
    adaptive = (labels * (1 - p)).sum() - ((1 - labels) * p).sum()
    loss = bce + adaptive.abs()
    optimizer.zero_grad(set_to_none=True)
    adaptive_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    adaptive_optimizer.step()
    return loss

  def synchronize():
    if device.type == 'cuda':
      torch.cuda.synchronize()

  compiled_step = torch.compile(step) if args.compile else step
  start = time.perf_counter()
  compiled_step()
  synchronize()
  first_step_seconds = time.perf_counter() - start
  compiled_step()
  synchronize()
  start = time.perf_counter()
  for _ in range(args.steps):
    compiled_step()
  synchronize()
  train_rate = args.steps * args.batch_size / (time.perf_counter() - start)

  model.eval()
  with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
    for _ in range(2):  # two warm-ups and max(3, steps // 2) timed batches, as hml_jax.benchmark
      model(images)
    synchronize()
    eval_steps = max(3, args.steps // 2)
    start = time.perf_counter()
    for _ in range(eval_steps):
      model(images)
    synchronize()
    eval_rate = eval_steps * args.batch_size / (time.perf_counter() - start)
  print(
      json.dumps({
          'framework':
              'torch',
          'train_images_per_sec':
              round(train_rate, 2),
          'compile_seconds':
              round(first_step_seconds, 2),
          'eval_images_per_sec':
              round(eval_rate, 2),
          'input_images_per_sec':
              None,
          'step_memory_mb': (round(torch.cuda.max_memory_allocated() /
                                   2**20, 1) if device.type == 'cuda' else None),
          'peak_host_memory_mb':
              round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
          'device': (torch.cuda.get_device_name()
                     if device.type == 'cuda' else f'cpu ({torch.get_num_threads()} threads)'),
          'memory_allocator':
              memory_allocator(),
          'torch':
              torch.__version__,
          'config': {
              'model': args.model,
              'loss': 'hml',
              'image_size': args.image_size,
              'batch_size': args.batch_size,
              'bf16': args.bf16,
              'channels_last': args.channels_last,
              'compile': args.compile,
              'cudnn_benchmark': torch.backends.cudnn.benchmark,
              'fused_adam': fused,
              'num_labels': args.num_labels
          }
      }))


if __name__ == '__main__':
  main()
