"""Writes tests/fixtures/torchvision_resnet_small.pth: the state dict of
tests/fixtures/torchvision_resnet_small.npz saved by torch.save, as torchvision's weights files are
(a zip archive; an OrderedDict with a _metadata attribute, as Module.state_dict() returns it).

Needs torch (not a requirement of this project); runs from the repository root:

  PYTHONPATH=. python scripts/make_pth_fixture.py

tests/test_pth_files.py reads the file without torch and compares it with the .npz.
"""
import collections
import os

import numpy as np
import torch

FIXTURES = os.path.join('tests', 'fixtures')
PREFIX = 'state_dict/'


def main():
  with np.load(os.path.join(FIXTURES, 'torchvision_resnet_small.npz')) as data:
    state_dict = collections.OrderedDict((name[len(PREFIX):], torch.from_numpy(data[name].copy()))
                                         for name in data.files
                                         if name.startswith(PREFIX))
  # What nn.Module.state_dict() attaches: per-module versions, pickled with the dict.
  state_dict._metadata = collections.OrderedDict(  # pylint: disable=protected-access
      [('', {
          'version': 1
      }), ('bn1', {
          'version': 2
      })])
  output = os.path.join(FIXTURES, 'torchvision_resnet_small.pth')
  torch.save(state_dict, output)
  print(f'Wrote {output} ({os.path.getsize(output)} bytes, torch {torch.__version__}, '
        f'{len(state_dict)} entries)')


if __name__ == '__main__':
  main()
