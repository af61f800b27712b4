"""Checkpoint manifests: every saved checkpoint lists its files' SHA-256 and size, and a restore
checks them, so a flipped bit is found instead of being restored as a wrong parameter."""
import hashlib
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from hml_jax.runtime import errors
from hml_jax.state import checkpoints
from hml_jax.state import workdir_files

MANIFEST = checkpoints.MANIFEST


def state_of(epoch):
  return {'w': np.arange(4096, dtype=np.float32) * epoch, 'b': np.full(3, epoch, np.float32)}


TEMPLATE = jax.tree_util.tree_map(np.zeros_like, state_of(0))


def saved_run(workdir, epochs=(1, 2), best=(1,)):
  manager = checkpoints.Checkpointer(str(workdir), keep=5)
  for epoch in epochs:
    manager.save(epoch, state_of(epoch), {'epochs': list(range(1, epoch + 1))}, epoch in best)
  return manager


def walk(step_dir):
  """Every file under step_dir, relative path -> full path (the test's own listing)."""
  return {
      os.path.relpath(os.path.join(parent, name), step_dir): os.path.join(parent, name)
      for parent, _, names in os.walk(step_dir) for name in names
  }


def largest_file(step_dir):
  return max((p for r, p in walk(step_dir).items() if r != MANIFEST), key=os.path.getsize)


def flip_a_bit(path):
  data = bytearray(open(path, 'rb').read())
  data[len(data) // 2] ^= 0x10
  with open(path, 'wb') as f:
    f.write(data)


def assert_state(restored, epoch):
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored[0], state_of(epoch))
  assert restored[1] == {'epochs': list(range(1, epoch + 1))}


def test_every_checkpoint_gets_a_manifest_of_its_files(tmp_path):
  manager = saved_run(tmp_path)
  manager.save_preempted(30, state_of(3), {'epochs': [1, 2], 'partial': {'epoch': 3}})
  for step_dir in ('checkpoints/1', 'checkpoints/2', 'best/1', 'preempted/30'):
    step_dir = tmp_path / step_dir
    manifest = json.loads((step_dir / MANIFEST).read_text())
    listed = walk(step_dir)
    del listed[MANIFEST]
    assert sorted(manifest['files']) == sorted(listed) and len(listed) > 5
    for relative, path in listed.items():
      data = open(path, 'rb').read()
      assert manifest['files'][relative] == {
          'sha256': hashlib.sha256(data).hexdigest(),
          'size': len(data)
      }
    assert checkpoints.verify_manifest(str(step_dir))
  assert not [p for p in walk(tmp_path) if p.endswith('.tmp')]


def test_orbax_alone_restores_a_flipped_bit_silently(tmp_path):
  """Why the manifest exists: without it the damaged epoch restores, with wrong values."""
  saved_run(tmp_path)
  flip_a_bit(largest_file(tmp_path / 'checkpoints' / '2'))
  os.remove(tmp_path / 'checkpoints' / '2' / MANIFEST)
  restored, _ = checkpoints.Checkpointer(str(tmp_path), keep=5).restore_latest(TEMPLATE)
  assert not np.array_equal(restored['w'], state_of(2)['w'])


def test_a_flipped_bit_falls_back_to_the_previous_checkpoint(tmp_path, caplog):
  saved_run(tmp_path)
  newest = tmp_path / 'checkpoints' / '2'
  damaged = largest_file(newest)
  size = os.path.getsize(damaged)
  flip_a_bit(damaged)
  assert os.path.getsize(damaged) == size  # what truncation checks cannot see
  with caplog.at_level('WARNING'):
    restored = checkpoints.Checkpointer(str(tmp_path), keep=5).restore_latest(TEMPLATE)
  assert_state(restored, 1)
  assert f'Checkpoint {newest} is unreadable (CorruptCheckpointError: {damaged} has SHA-256' in (
      caplog.text)
  assert not newest.exists()
  (aside,) = os.listdir(tmp_path / 'unreadable_checkpoints')
  assert aside.startswith('checkpoints_2_')
  assert checkpoints.Checkpointer(str(tmp_path), keep=5).latest.all_steps() == [1]


@pytest.mark.parametrize('damage', ['truncate', 'remove', 'manifest'])
def test_other_damage_is_named(tmp_path, damage):
  saved_run(tmp_path)
  step_dir = tmp_path / 'checkpoints' / '2'
  path = largest_file(step_dir)
  if damage == 'truncate':
    with open(path, 'r+b') as f:
      f.truncate(100)
    message = f'{path} has 100 bytes, not the'
  elif damage == 'remove':
    os.remove(path)
    message = f'{path} is missing'
  else:
    flip_a_bit(step_dir / MANIFEST)
    message = f'{step_dir / MANIFEST} is damaged'
  with pytest.raises(checkpoints.CorruptCheckpointError, match=message):
    checkpoints.verify_manifest(str(step_dir))


def test_a_checkpoint_without_manifest_restores_with_one_warning(tmp_path, caplog):
  saved_run(tmp_path)
  os.remove(tmp_path / 'checkpoints' / '2' / MANIFEST)  # as an older hml_jax wrote it
  with caplog.at_level('WARNING'):
    restored = checkpoints.Checkpointer(str(tmp_path), keep=5).restore_latest(TEMPLATE)
  assert_state(restored, 2)
  assert [r.getMessage() for r in caplog.records if r.levelname == 'WARNING'] == [
      f'Checkpoint {tmp_path / "checkpoints" / "2"} has no {MANIFEST} (an older hml_jax wrote '
      'it, or the run stopped just before writing it): restored without checking its files.'
  ]


def test_a_corrupt_best_checkpoint_is_a_user_error_and_is_replaced_by_the_next_best(
    tmp_path, caplog):
  saved_run(tmp_path)
  best = tmp_path / 'best' / '1'
  damaged = largest_file(best)
  flip_a_bit(damaged)
  with pytest.raises(errors.UserError) as raised:
    checkpoints.Checkpointer(str(tmp_path), keep=5).restore_best(TEMPLATE)
  message = str(raised.value)
  assert f'The best checkpoint {best} is damaged: {damaged} has SHA-256' in message
  assert 'train again' in message and '--checkpoint=latest' in message
  assert best.exists()  # reading changes nothing
  # Resuming warns; the next best epoch replaces it.
  manager = checkpoints.Checkpointer(str(tmp_path), keep=5)
  with caplog.at_level('WARNING'):
    assert_state(manager.restore_latest(TEMPLATE), 2)
  assert f'The best checkpoint {best} is damaged' in caplog.text
  manager.save(3, state_of(3), {'epochs': [1, 2, 3]}, is_best=True)
  assert os.listdir(tmp_path / 'best') == ['3']
  assert_state(checkpoints.Checkpointer(str(tmp_path), keep=5).restore_best(TEMPLATE), 3)


def test_the_manifest_waits_for_an_asynchronous_save(tmp_path, monkeypatch):
  """Were saves asynchronous, the manifest must still describe the finished checkpoint."""
  original = ocp.CheckpointManagerOptions

  def asynchronous(**options):
    return original(**dict(options, enable_async_checkpointing=True))

  monkeypatch.setattr(ocp, 'CheckpointManagerOptions', asynchronous)
  manager = saved_run(tmp_path)
  assert manager.latest._options.enable_async_checkpointing  # pylint: disable=protected-access
  step_dir = tmp_path / 'checkpoints' / '2'
  listed = walk(step_dir)
  del listed[MANIFEST]
  assert sorted(json.loads((step_dir / MANIFEST).read_text())['files']) == sorted(listed)
  assert checkpoints.verify_manifest(str(step_dir))


def test_a_failed_save_writes_no_manifest(tmp_path, monkeypatch):
  manager = saved_run(tmp_path, epochs=(1,))

  def failing_save(*args, **kwargs):
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(manager.latest, 'save', failing_save)
  with pytest.raises(checkpoints.SaveError, match='epoch 1 .* is intact'):
    manager.save(2, state_of(2), {'epochs': [1, 2]}, is_best=False)
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1']


def test_damaged_workdir_json_names_the_file(tmp_path):
  (tmp_path / 'config.json').write_text('{"loss": "hml", "seed"')  # cut short
  with pytest.raises(errors.InvalidInputError,
                     match=f'{tmp_path / "config.json"} is not valid JSON .truncated.*'
                     'another --workdir'):
    workdir_files.read_config(str(tmp_path))


def test_a_workdir_from_before_the_input_guards_resumes(tmp_path):
  """config.json of a run made before dataset.max_image_pixels and dataset.allow_outside_paths
  existed: resuming with the current folder config is allowed (they only admit or refuse files),
  while a key that changes what is computed still refuses."""
  from hml_jax.configs import folder  # pylint: disable=import-outside-toplevel
  config = folder.get_config()
  config.dataset.path = str(tmp_path / 'data')
  old = json.loads(config.to_json())
  for key in ('max_image_pixels', 'allow_outside_paths'):
    old['dataset'].pop(key, None)
  (tmp_path / 'config.json').write_text(
      json.dumps({
          workdir_files.FORMAT_KEY: workdir_files.FORMAT_VERSION,
          **old
      }))
  workdir_files.check_config(str(tmp_path), config)
  config.learning_rate = config.learning_rate * 2
  with pytest.raises(errors.InvalidInputError, match='learning_rate: '):
    workdir_files.check_config(str(tmp_path), config)
