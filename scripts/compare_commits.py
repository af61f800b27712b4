"""Shows that a refactor changed no result: the same training command at two commits, and their
results.json numbers compared exactly.

  PYTHONPATH=. python scripts/compare_commits.py BASE_COMMIT [--config=configs/default.py]
      [--out=/tmp/compare_commits] [-- EXTRA hml_jax.main FLAGS]

BASE_COMMIT is checked out into a git worktree beside this one (removed afterwards); both trees
train with the same TFDS data_dir. Every number of results.json that both versions write (mAPs
of every epoch and label, s*, m*, losses, accumulated gradients, best epoch) must be equal, bit
for bit; the timings and keys that only the newer version writes are listed, not compared.
Exit status 0 when equal, 1 otherwise.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMINGS = ('train_images_per_sec', 'wall_seconds')


def train(tree, workdir, config, extra, data_dir):
  environment = {**os.environ, 'PYTHONPATH': tree, 'TFDS_DATA_DIR': data_dir}
  subprocess.run(
      [sys.executable, '-m', 'hml_jax.main', f'--config={config}', f'--workdir={workdir}', *extra],
      cwd=tree,
      env=environment,
      check=True,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL)
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f)


def differences(base, new, path=''):
  """[(path, base value, new value)] where the two disagree; keys only in new are skipped."""
  found = []
  if isinstance(base, dict):
    for key, value in base.items():
      if key in TIMINGS or (path == '' and key == 'config'):
        continue
      if key not in new:
        found.append((f'{path}{key}', value, '<absent>'))
      else:
        found += differences(value, new[key], f'{path}{key}.')
  elif isinstance(base, list):
    if len(base) != len(new):
      return [(path, f'{len(base)} items', f'{len(new)} items')]
    for index, (a, b) in enumerate(zip(base, new)):
      found += differences(a, b, f'{path}{index}.')
  elif base != new:
    found.append((path.rstrip('.'), base, new))
  return found


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('base')
  parser.add_argument('--config', default='configs/default.py')
  parser.add_argument('--out', default='/tmp/compare_commits')
  argv = sys.argv[1:]
  extra = argv[argv.index('--') + 1:] if '--' in argv else []
  args = parser.parse_args(argv[:argv.index('--')] if '--' in argv else argv)
  args.extra = extra
  shutil.rmtree(args.out, ignore_errors=True)
  os.makedirs(args.out)
  base_tree = os.path.join(args.out, 'base_tree')
  subprocess.run(['git', 'worktree', 'add', '--detach', base_tree, args.base],
                 cwd=ROOT,
                 check=True,
                 stdout=subprocess.DEVNULL)
  try:
    data_dir = os.path.join(args.out, 'tensorflow_datasets')
    base = train(base_tree, os.path.join(args.out, 'base_run'), args.config, args.extra, data_dir)
    new = train(ROOT, os.path.join(args.out, 'new_run'), args.config, args.extra, data_dir)
  finally:
    subprocess.run(['git', 'worktree', 'remove', '--force', base_tree], cwd=ROOT, check=False)
  found = differences(base, new)
  only_new = sorted(set(new) - set(base))
  print(f'{args.base} against the working tree, {args.config} {" ".join(args.extra)}: '
        f"test mAP {base['test_map']} / {new['test_map']}, {len(base['epochs'])} epochs; keys "
        f'only in the new results.json: {only_new}')
  for where, a, b in found:
    print(f'  differs: {where}: {a!r} != {b!r}')
  print('identical' if not found else f'{len(found)} differences')
  sys.exit(1 if found else 0)


if __name__ == '__main__':
  main()
