"""Checkpoints in the workdir with orbax: the latest epochs (for resuming) and the best epoch.

workdir/checkpoints/<epoch>: the newest config.checkpoints_to_keep epochs; resuming restores the
  newest one: train state (parameters, BatchNorm statistics, optimizer state, step, learned s*, m*)
  and the history of evaluated epochs. The data order is a function of (seed, epoch), so nothing
  else is needed for the resumed run to equal an uninterrupted one.
workdir/best/<epoch>: the epoch with the best validation mAP so far, never deleted by the
  retention of the latest ones.
workdir/config.json: the config of the run, checked when the same workdir is used again.
"""
import json
import os
import socket
import time

from absl import logging
import flax
import jax
import ml_collections
import orbax.checkpoint as ocp

from hml_jax import files

# Keys that may change when a run is resumed: they do not change what has been computed.
# Where the data lives and how many threads read it are not part of what is computed either.
# How the train state is laid out over the devices (parameter_sharding, fsdp_min_size) is not
# either: the same arrays are computed, split or not.
RESUMABLE_KEYS = frozenset({
    'num_epochs', 'log_every_steps', 'checkpoints_to_keep', 'eval_batch_size', 'dataset.data_dir',
    'dataset.manual_dir', 'dataset.parallel_calls', 'convolutions', 'parameter_sharding',
    'fsdp_min_size'
})

# The version of what a workdir holds (config.json, dataset.json, the checkpoints' tree), written
# into config.json as FORMAT_KEY. A workdir of another version is refused with a clear error:
# this version does not guess what older runs meant by keys they lacked.
FORMAT_KEY = 'hml_jax_workdir_format'
FORMAT_VERSION = 2


def flatten(tree, prefix=''):
  """{'a': {'b': 1}} -> {'a.b': 1}, tuples as lists (as they come back from JSON)."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = list(value) if isinstance(value, tuple) else value
  return flat


def config_path(workdir):
  return files.join(workdir, 'config.json')


def has_checkpoint(workdir: str) -> bool:
  """Whether workdir holds a checkpoint (of an epoch, or of a preempted step) that a run there
  resumes from."""
  for folder in ('checkpoints', 'preempted'):
    checkpoint_dir = files.join(workdir, folder)
    if files.is_dir(checkpoint_dir) and any(
        name.isdigit() for name in files.listdir(checkpoint_dir)):
      return True
  return False


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config of the run in workdir (its config.json), after checking that this version of
  hml_jax made it: an older or newer workdir format is a ValueError that says what to do."""
  path = config_path(workdir)
  saved = files.read_json(path)
  version = saved.pop(FORMAT_KEY, 1)
  if version != FORMAT_VERSION:
    raise ValueError(
        f'{workdir} was made by {"an older" if version < FORMAT_VERSION else "a newer"} version '
        f'of hml_jax (workdir format {version}; this version reads format {FORMAT_VERSION}, '
        f'{FORMAT_KEY} in {path}). Resume or read it with the version that made it, or train '
        'anew in another --workdir; nothing was changed.')
  return ml_collections.ConfigDict(saved)


def check_config(workdir: str,
                 config: ml_collections.ConfigDict,
                 resumable_keys=RESUMABLE_KEYS) -> None:
  """Refuses a workdir whose run used an incompatible config, or that another version of hml_jax
  made (and changes nothing in it)."""
  path = config_path(workdir)
  if not files.exists(path):
    if has_checkpoint(workdir):
      raise ValueError(f'{workdir} holds checkpoints but no config.json: it was not made by this '
                       'version of hml_jax. Use another --workdir.')
    return
  saved = flatten(read_config(workdir).to_dict())
  current = flatten(json.loads(config.to_json()))
  differences = [
      f'{key}: {saved.get(key, "<absent>")!r} in the workdir, '
      f'{current.get(key, "<absent>")!r} now'
      for key in sorted(set(saved) | set(current))
      if key not in resumable_keys and saved.get(key) != current.get(key)
  ]
  if differences:
    raise ValueError(f'{workdir} holds a run made with a different config, so it cannot be '
                     'resumed; use another --workdir (nothing was changed). Differences:\n  ' +
                     '\n  '.join(differences))


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """config.json: the config and the workdir format (never half-written)."""
  files.write_json(config_path(workdir), {
      FORMAT_KEY: FORMAT_VERSION,
      **json.loads(config.to_json())
  })


def dataset_info_path(workdir):
  return files.join(workdir, 'dataset.json')


def write_dataset_info(workdir: str,
                       label_names,
                       example_shape,
                       num_train: int,
                       fingerprint: str = '') -> None:
  """workdir/dataset.json: what a trained model needs without the data (label names for
  predictions, the input shape and the training split's size for restoring the state), and a
  fingerprint of the labels that resuming checks."""
  files.write_json(
      dataset_info_path(workdir), {
          'label_names': list(label_names),
          'example_shape': list(example_shape),
          'num_train': int(num_train),
          'fingerprint': fingerprint
      })


def check_dataset(workdir: str, fingerprint: str) -> None:
  """Refuses to resume on other data (an edited CSV, another prepared dataset) than the run
  started with: the rows would silently change meaning."""
  path = dataset_info_path(workdir)
  if not files.exists(path):
    return
  saved = files.read_json(path).get('fingerprint')
  if saved and saved != fingerprint:
    raise ValueError(f'The data differs from the data {workdir} was trained on (label '
                     f'fingerprint {fingerprint[:12]} now, {saved[:12]} in {path}), so the run '
                     'cannot be resumed; restore that data or use another --workdir.')


def read_dataset_info(workdir: str):
  """dataset.json of a run: label names, input shape, training-split size, data fingerprint."""
  read_config(workdir)  # the same format
  return files.read_json(dataset_info_path(workdir))


class WorkdirLock:
  """workdir/lock while a run trains there: a second run on the same workdir is refused instead
  of both writing. A lock left by a process that no longer runs (killed) on this host is taken
  over with a warning; one from another host must be removed by hand after checking."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, 'lock')
    self.owner = f'{socket.gethostname()} {os.getpid()}'

  def _holder(self):
    try:
      with open(self.path) as f:
        host, pid = f.read().split()[:2]
      return host, int(pid)
    except (OSError, ValueError):
      return None

  def __enter__(self):
    if not files.is_local(self.path):
      # Object stores have no exclusive create here: one run per bucket workdir is up to you.
      logging.warning('No lock on %s: make sure no other run uses this workdir.', self.path)
      return self
    for _ in range(2):
      try:
        descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      except FileExistsError:
        holder = self._holder()
        if holder and holder[0] == socket.gethostname() and not _process_alive(holder[1]):
          logging.warning('Taking over %s, left by process %d, which is no longer running.',
                          self.path, holder[1])
          os.remove(self.path)
          continue
        who = f'process {holder[1]} on {holder[0]}' if holder else 'another run'
        raise RuntimeError(f'{os.path.dirname(self.path)} is in use by {who} ({self.path}); '
                           'two runs must not share a workdir. Wait for it, use another '
                           '--workdir, or delete the lock file if that run is gone.') from None
      with os.fdopen(descriptor, 'w') as f:
        f.write(self.owner + '\n')
      return self
    raise RuntimeError(f'Could not take {self.path}.')

  def __exit__(self, *exc):
    if files.is_local(self.path) and self._holder() == (socket.gethostname(), os.getpid()):
      os.remove(self.path)
    return False


def _process_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
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

  def save(self, epoch: int, state, history, is_best: bool) -> None:
    # Best first: a crash between the two saves then repeats this epoch on resume (and replaces
    # its best checkpoint) instead of resuming past an epoch whose best checkpoint is missing.
    try:
      if is_best:
        if epoch in self.best.all_steps():
          self.best.delete(epoch)
        self.best.save(epoch, args=self._args(state, history))
      self.latest.save(epoch, args=self._args(state, history))
    except OSError as error:
      raise _save_error(f'epoch {epoch}', self.latest, error) from error
    for step in self.preempted.all_steps():
      self.preempted.delete(step)

  def save_preempted(self, step: int, state, history) -> None:
    """A mid-epoch checkpoint (history['partial'] says how far the epoch got)."""
    try:
      self.preempted.save(step, args=self._args(state, history), force=True)
      self.preempted.wait_until_finished()
    except OSError as error:
      raise _save_error(f'step {step}', self.latest, error) from error

  def _restore(self, manager, step, state):
    """state: a template giving the tree, shapes and shardings; its leaves may be arrays or
    jax.ShapeDtypeStruct with a sharding (sharding.abstract_arrays). Orbax reads each array
    straight into that sharding, whatever layout it was saved in (each process reads only its
    own devices' shards)."""
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
      return state_and_history
    if any(manager is self.latest for manager, _ in candidates):
      # Starting over would overwrite them: refuse instead.
      raise RuntimeError(f'No checkpoint in {self.latest.directory} restores (see the warnings '
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
    step = self.best.latest_step()
    if step is None:
      return None
    return self._restore(self.best, step, state)

  def wait(self):
    self.latest.wait_until_finished()
    self.best.wait_until_finished()


def _save_error(what, manager, error):
  steps = manager.all_steps()
  kept = (f'the checkpoint of epoch {max(steps)} in {manager.directory} is intact and the run '
          'resumes from it' if steps else 'no earlier checkpoint exists')
  return RuntimeError(f'Could not save the checkpoint of {what} ({type(error).__name__}: '
                      f'{error}); {kept}. Free disk space or make the workdir writable, then run '
                      'the same command again.')
