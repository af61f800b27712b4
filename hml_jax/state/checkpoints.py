"""Checkpoints in the workdir with orbax: the latest epochs (for resuming) and the best epoch.

workdir/checkpoints/<epoch>: the newest config.checkpoints_to_keep epochs; resuming restores the
  newest one: train state (parameters, BatchNorm statistics, optimizer state, step, learned s*, m*)
  and the history of evaluated epochs. The data order is a function of (seed, epoch), so nothing
  else is needed for the resumed run to equal an uninterrupted one.
workdir/best/<epoch>: the epoch with the best validation mAP so far, never deleted by the
  retention of the latest ones.
workdir/config.json, workdir/dataset.json: the run's record (hml_jax/state/workdir_files.py).
"""
import hashlib
import json
import os
import time

from absl import logging
import flax
import jax
import orbax.checkpoint as ocp

from hml_jax.runtime import errors
from hml_jax.runtime import files
from hml_jax.state.workdir_lock import WorkdirInUseError, WorkdirLock  # noqa: F401

MANIFEST = 'sha256_manifest.json'


class CorruptCheckpointError(errors.InvalidInputError):
  """A checkpoint's files differ from what its manifest recorded when it was saved."""


def _digest_of(entries) -> str:
  """SHA-256 of the manifest's entries, so that a damaged manifest is told from damaged files."""
  return hashlib.sha256(json.dumps(entries, sort_keys=True).encode('utf-8')).hexdigest()


def write_manifest(step_dir) -> None:
  """step_dir/MANIFEST: each file's relative path, SHA-256 and size. Written (atomically) only
  once the checkpoint is complete, so that it describes what orbax finished writing."""
  entries = {}
  for relative, path in files.tree_files(step_dir).items():
    if relative != MANIFEST:
      digest, size = files.sha256_and_size(path)
      entries[relative] = {'sha256': digest, 'size': size}
  files.write_json(files.join(step_dir, MANIFEST), {
      'files': entries,
      'sha256_of_files': _digest_of(entries)
  })


def verify_manifest(step_dir) -> bool:
  """Checks step_dir's files against its manifest: True if they match, False if it has none (a
  checkpoint of an older hml_jax, or of a run stopped just before writing it); a
  CorruptCheckpointError naming the first file that differs (missing, other size, other bytes)
  otherwise. Files the manifest does not list are ignored."""
  path = files.join(step_dir, MANIFEST)
  if not files.exists(path):
    return False
  try:
    manifest = files.read_json(path)
    entries = manifest['files']
    intact = manifest['sha256_of_files'] == _digest_of(entries)
  except (errors.InvalidInputError, KeyError, TypeError):
    intact = False
  if not intact:
    raise CorruptCheckpointError(f'{path} is damaged, so the checkpoint cannot be checked.')
  present = files.tree_files(step_dir)
  # Sizes first: they need no reading, and a cut-short file (a crash mid-write) shows at once.
  for relative, entry in entries.items():
    if relative not in present:
      raise CorruptCheckpointError(f'{files.join(step_dir, relative)} is missing ({MANIFEST} '
                                   'lists it).')
    size = files.size(present[relative])
    if size != entry['size']:
      raise CorruptCheckpointError(f'{present[relative]} has {size} bytes, not the '
                                   f'{entry["size"]} it was saved with.')
  for relative, entry in entries.items():
    digest, _ = files.sha256_and_size(present[relative])
    if digest != entry['sha256']:
      raise CorruptCheckpointError(f'{present[relative]} has SHA-256 {digest[:16]}..., not the '
                                   f'{entry["sha256"][:16]}... it was saved with: its bytes '
                                   'changed on disk.')
  return True


class Checkpointer:
  """Latest and best checkpoints of one run."""

  def __init__(self, workdir: str, keep: int):
    self.workdir = files.absolute(workdir)
    options = dict(create=True, enable_async_checkpointing=False)
    # Synchronous saves: the train step donates the state's buffers, so a background copy of them
    # could race with the next step.
    self.latest = ocp.CheckpointManager(files.join(self.workdir, 'checkpoints'),
                                        options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                                                             **options))
    self.best = ocp.CheckpointManager(files.join(self.workdir, 'best'),
                                      options=ocp.CheckpointManagerOptions(max_to_keep=1,
                                                                           **options))
    # Mid-epoch checkpoints written on SIGTERM / Ctrl-C, by global step; removed once the epoch
    # they interrupted is finished and saved.
    self.preempted = ocp.CheckpointManager(files.join(self.workdir, 'preempted'),
                                           options=ocp.CheckpointManagerOptions(max_to_keep=1,
                                                                                **options))

  @staticmethod
  def _args(state, history):
    return ocp.args.Composite(state=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
                              history=ocp.args.JsonSave(history))

  def _save(self, manager, step, state, history, **options) -> None:
    """Saves, waits until orbax has finalized the checkpoint (also were saves asynchronous), then
    writes its manifest: a manifest only ever describes a complete checkpoint."""
    if manager.save(step, args=self._args(state, history), **options):
      manager.wait_until_finished()
      # Every process's files are there once save returns (orbax's barrier before finalizing).
      if jax.process_index() == 0:
        write_manifest(files.join(manager.directory, str(step)))

  def save(self, epoch: int, state, history, is_best: bool) -> None:
    # Best first: a crash between the two saves then repeats this epoch on resume (and replaces
    # its best checkpoint) instead of resuming past an epoch whose best checkpoint is missing.
    # best/ keeps one checkpoint: saving a new best removes the previous one, damaged or not.
    try:
      if is_best:
        if epoch in self.best.all_steps():
          self.best.delete(epoch)
        self._save(self.best, epoch, state, history)
      self._save(self.latest, epoch, state, history)
    except OSError as error:
      raise _save_error(f'epoch {epoch}', self.latest, error) from error
    for step in self.preempted.all_steps():
      self.preempted.delete(step)

  def save_preempted(self, step: int, state, history) -> None:
    """A mid-epoch checkpoint (history['partial'] says how far the epoch got)."""
    try:
      self._save(self.preempted, step, state, history, force=True)
    except OSError as error:
      raise _save_error(f'step {step}', self.latest, error) from error

  def _restore(self, manager, step, state):
    """state: a template giving the tree, shapes and shardings; its leaves may be arrays or
    jax.ShapeDtypeStruct with a sharding (sharding.abstract_arrays). Orbax reads each array
    straight into that sharding, whatever layout it was saved in (each process reads only its
    own devices' shards). The checkpoint's files are checked against its manifest first (by every
    process, which so decide alike): a CorruptCheckpointError if they differ."""
    step_dir = files.join(manager.directory, str(step))
    if not verify_manifest(step_dir):
      logging.warning(
          'Checkpoint %s has no %s (an older hml_jax wrote it, or the run stopped just '
          'before writing it): restored without checking its files.', step_dir, MANIFEST)
    target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                    flax.serialization.to_state_dict(state))
    restored = manager.restore(step,
                               args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                       history=ocp.args.JsonRestore()))
    return flax.serialization.from_state_dict(state, restored['state']), restored['history']

  def restore_latest(self, state):
    """(state, history) of the newest checkpoint that restores, or None if there is none: a
    mid-epoch (preempted) one if it is newer than the last finished epoch, else the newest
    epoch. A checkpoint that fails to restore (half-written, corrupt) is skipped with a warning
    naming it, and the next older one is tried."""
    epochs_done = max(self.latest.all_steps(), default=0)
    candidates = ([(self.preempted, step) for step in sorted(self.preempted.all_steps())[::-1]] +
                  [(self.latest, step) for step in sorted(self.latest.all_steps())[::-1]])
    unreadable = []
    for manager, step in candidates:
      try:
        state_and_history = self._restore(manager, step, state)
      except Exception as error:  # pylint: disable=broad-except  (orbax raises many kinds)
        logging.warning('Checkpoint %s is unreadable (%s: %s); trying an older one.',
                        files.join(manager.directory, str(step)),
                        type(error).__name__,
                        str(error).splitlines()[0] if str(error) else '')
        unreadable.append((manager, step))
        continue
      if manager is self.preempted and state_and_history[1].get('partial', {}).get(
          'epoch', 0) <= epochs_done:
        continue  # an epoch finished after it was written
      self._set_aside(unreadable)
      self._warn_if_best_is_corrupt()
      return state_and_history
    if any(manager is self.latest for manager, _ in candidates):
      # Starting over would overwrite them: refuse instead.
      raise UnreadableCheckpointsError(
          f'No checkpoint in {self.latest.directory} restores (see the warnings '
          'above); nothing was changed. Use another --workdir, or remove the '
          'damaged checkpoints to start over.')
    return None

  def _set_aside(self, unreadable):
    """Moves unreadable checkpoints to workdir/unreadable_checkpoints/ (kept for inspection),
    so that the epochs trained again can be saved under their numbers."""
    if jax.process_index() > 0:  # process 0 moves them; the others only look again
      for manager, _ in unreadable:
        manager.reload()
      return
    for manager, step in unreadable:
      source = files.join(manager.directory, str(step))
      name = f'{os.path.basename(str(manager.directory))}_{step}_{int(time.time())}'
      files.makedirs(files.join(self.workdir, 'unreadable_checkpoints'))
      target = files.join(self.workdir, 'unreadable_checkpoints', name)
      files.rename(source, target)
      logging.warning('Moved the unreadable checkpoint %s to %s.', source, target)
      manager.reload()

  def restore_best(self, state):
    """(state, history) of the best epoch, or None if there is none. best/ holds one
    checkpoint, so a damaged one has nothing to fall back to: a CorruptCheckpointError naming
    the file and what to do."""
    step = self.best.latest_step()
    if step is None:
      return None
    try:
      return self._restore(self.best, step, state)
    except CorruptCheckpointError as error:
      raise CorruptCheckpointError(_corrupt_best_message(self.best, step, error)) from None

  def _warn_if_best_is_corrupt(self) -> None:
    """A warning when resuming (or reading the newest epoch) if best/ is damaged: training
    replaces it at the next epoch that beats its validation mAP; until then eval and predict
    with the best checkpoint refuse it."""
    step = self.best.latest_step()
    if step is None or jax.process_index() > 0:
      return
    try:
      verify_manifest(files.join(self.best.directory, str(step)))
    except CorruptCheckpointError as error:
      logging.warning('%s It is replaced when an epoch beats its validation mAP.',
                      _corrupt_best_message(self.best, step, error))

  def wait(self):
    self.latest.wait_until_finished()
    self.best.wait_until_finished()


class UnreadableCheckpointsError(errors.UserError, RuntimeError):
  """No checkpoint of a workdir that has some restores."""


class SaveError(errors.UserError, RuntimeError):
  """A checkpoint could not be written (disk full, workdir not writable)."""


def _corrupt_best_message(manager, step, error) -> str:
  return (f'The best checkpoint {files.join(manager.directory, str(step))} is damaged: {error} '
          'best/ keeps only this one: train again (in another --workdir), or use the newest '
          "epoch's checkpoint instead (--checkpoint=latest).")


def _save_error(what, manager, error):
  steps = manager.all_steps()
  kept = (f'the checkpoint of epoch {max(steps)} in {manager.directory} is intact and the run '
          'resumes from it' if steps else 'no earlier checkpoint exists')
  return SaveError(f'Could not save the checkpoint of {what} ({type(error).__name__}: '
                   f'{error}); {kept}. Free disk space or make the workdir writable, then run '
                   'the same command again.')
