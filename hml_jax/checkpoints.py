"""Checkpoints in the workdir with orbax: the latest epochs (for resuming) and the best epoch.

workdir/checkpoints/<epoch>: the newest config.checkpoints_to_keep epochs; resuming restores the
  newest one: train state (parameters, BatchNorm statistics, optimizer state, step, learned s*, m*)
  and the history of evaluated epochs. The data order is a function of (seed, epoch), so nothing
  else is needed for the resumed run to equal an uninterrupted one.
workdir/best/<epoch>: the epoch with the best validation mAP so far, never deleted by the
  retention of the latest ones.
workdir/config.json: the config of the run, checked when the same workdir is used again.
"""
import errno
import fcntl
import hashlib
import json
import os
import socket
import time

from absl import logging
import flax
import jax
import ml_collections
import orbax.checkpoint as ocp

from hml_jax import errors
from hml_jax import files

# Keys that may change when a run is resumed: they do not change what has been computed.
# Where the data lives and how many threads read it are not part of what is computed either.
# How the train state is laid out over the devices (parameter_sharding, fsdp_min_size) is not
# either: the same arrays are computed, split or not. The input guards (max_image_pixels,
# allow_outside_paths) only refuse or admit files; the images a run reads are decoded alike. And
# false_negative_images only measures.
RESUMABLE_KEYS = frozenset({
    'num_epochs', 'log_every_steps', 'checkpoints_to_keep', 'eval_batch_size', 'dataset.data_dir',
    'dataset.manual_dir', 'dataset.parallel_calls', 'convolutions', 'parameter_sharding',
    'fsdp_min_size', 'dataset.max_image_pixels', 'dataset.allow_outside_paths',
    'false_negative_images'
})

# Keys added to configs/default.py within this workdir format, with the value that a workdir
# written before them ran as (so such a workdir is still resumed and reused, not refused).
KEYS_ADDED_LATER = {
    'learning_rate_decay_epochs': [],
    'learning_rate_decay_factor': 0.1,
    'false_negative_images': 0
}


def without_later_defaults(config_dict: dict) -> dict:
  """config_dict (a config as a dict) without the KEYS_ADDED_LATER at the value they mean when
  absent: what a config of the same run written before them holds (so exported files and
  results stay byte for byte those of before)."""
  return {
      key: value for key, value in config_dict.items() if key not in KEYS_ADDED_LATER or
      flatten({key: value})[key] != KEYS_ADDED_LATER[key]
  }


# The version of what a workdir holds (config.json, dataset.json, the checkpoints' tree), written
# into config.json as FORMAT_KEY. A workdir of another version is refused with a clear error:
# this version does not guess what older runs meant by keys they lacked.
FORMAT_KEY = 'hml_jax_workdir_format'
FORMAT_VERSION = 2

# What to do about a config.json or dataset.json that does not parse.
_DAMAGED_WORKDIR_FILE = ('Restore it from a copy, or train anew in another --workdir; nothing was '
                         'changed.')


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
  hml_jax made it: an older or newer workdir format is an errors.InvalidInputError that says what to do."""
  path = config_path(workdir)
  saved = files.read_json(path, _DAMAGED_WORKDIR_FILE)
  version = saved.pop(FORMAT_KEY, 1)
  if version != FORMAT_VERSION:
    raise errors.InvalidInputError(
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
      raise errors.InvalidInputError(
          f'{workdir} holds checkpoints but no config.json: it was not made by this '
          'version of hml_jax. Use another --workdir.')
    return
  saved = {**KEYS_ADDED_LATER, **flatten(read_config(workdir).to_dict())}
  current = flatten(json.loads(config.to_json()))
  differences = [
      f'{key}: {saved.get(key, "<absent>")!r} in the workdir, '
      f'{current.get(key, "<absent>")!r} now'
      for key in sorted(set(saved) | set(current))
      if key not in resumable_keys and saved.get(key) != current.get(key)
  ]
  if differences:
    raise errors.InvalidInputError(
        f'{workdir} holds a run made with a different config, so it cannot be '
        'resumed; use another --workdir (nothing was changed). Differences:\n  ' +
        '\n  '.join(differences))


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """config.json: the config and the workdir format (never half-written)."""
  files.write_json(config_path(workdir), {
      FORMAT_KEY: FORMAT_VERSION,
      **json.loads(config.to_json())
  })


def record_num_epochs(workdir: str, num_epochs: int) -> None:
  """config.json's num_epochs set to a resumed run's (never half-written)."""
  saved = files.read_json(config_path(workdir))
  if saved.get('num_epochs') != num_epochs:
    files.write_json(config_path(workdir), {**saved, 'num_epochs': num_epochs})


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
  saved = files.read_json(path, _DAMAGED_WORKDIR_FILE).get('fingerprint')
  if saved and saved != fingerprint:
    raise errors.InvalidInputError(
        f'The data differs from the data {workdir} was trained on (label '
        f'fingerprint {fingerprint[:12]} now, {saved[:12]} in {path}), so the run '
        'cannot be resumed; restore that data or use another --workdir.')


def read_dataset_info(workdir: str):
  """dataset.json of a run: label names, input shape, training-split size, data fingerprint."""
  read_config(workdir)  # the same format
  return files.read_json(dataset_info_path(workdir), _DAMAGED_WORKDIR_FILE)


class WorkdirInUseError(errors.UserError, RuntimeError):
  """Another run holds the workdir's lock (or left it on another host)."""


# flock(2) fails with these where the filesystem has no file locks (some NFS, FUSE, SMB mounts).
_NO_FLOCK = frozenset({errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})


class WorkdirLock:
  """workdir/lock while a run trains there: a second run on the same workdir is refused instead
  of both writing.

  The lock is an flock(2) on the file, held for the run's lifetime; the file names the holder's
  host and process for the message. The kernel releases the flock of a process that ends in any
  way, so taking over the lock of a killed run is the same atomic flock call (of two runs racing
  for it exactly one gets it), whatever the file holds: a name, nothing (a run killed between
  creating and writing it) or garbage. A lock file that names another host is not taken over:
  where a filesystem keeps flocks per host, that run may still be alive; its lock is removed by
  hand after checking. Where the filesystem has no flocks at all, creating the file is the lock
  (with a warning) and a lock left behind is removed by hand too.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, 'lock')
    self.host = socket.gethostname()
    self.owner = f'{self.host} {os.getpid()}'
    self._descriptor = None

  def _holder(self):
    """(host, pid) that the lock file names, or None (absent, empty, garbage)."""
    try:
      with open(self.path, 'rb') as f:
        host, pid = f.read(4096).decode('utf-8').split()[:2]
      return host, int(pid)
    except (OSError, ValueError):
      return None

  def _holder_soon(self, seconds: float = 2.0):
    """The holder that the lock file names, waiting a moment for a run that has just taken the
    flock to write its name over the name of the dead run it took it from (or into an empty
    file)."""
    deadline = time.monotonic() + seconds
    while True:
      holder = self._holder()
      if (holder and (holder[0] != self.host or _process_alive(holder[1])) or
          time.monotonic() > deadline):
        return holder
      time.sleep(0.02)

  def _in_use(self, holder, note=''):
    who = f'process {holder[1]} on {holder[0]}' if holder else 'another run'
    return WorkdirInUseError(f'{os.path.dirname(self.path)} is in use by {who} ({self.path}); '
                             f'two runs must not share a workdir.{note} Wait for it, use another '
                             '--workdir, or delete the lock file if that run is gone.')

  def _open(self):
    """(descriptor, whether this call created the file); None if it vanished meanwhile."""
    try:
      try:
        return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
      except FileExistsError:
        return os.open(self.path, os.O_RDWR), False
    except FileNotFoundError:
      return None  # removed by the run that held it, between the two opens
    except OSError as error:
      raise errors.InvalidInputError(f'Cannot open the lock file {self.path} ({error}); make it '
                                     'and the workdir writable for this user, or use another '
                                     '--workdir.') from None

  def __enter__(self):
    if not files.is_local(self.path):
      # Object stores have no exclusive create here: one run per bucket workdir is up to you.
      logging.warning('No lock on %s: make sure no other run uses this workdir.', self.path)
      return self
    for _ in range(100):  # a retry only when the file was removed or replaced meanwhile
      opened = self._open()
      if opened is None:
        continue
      descriptor, created = opened
      try:
        if self._lock(descriptor, created):
          self._descriptor = descriptor
          return self
      except BaseException:
        os.close(descriptor)
        raise
      os.close(descriptor)
    raise RuntimeError(f'Could not take {self.path}: it kept being replaced.')

  def _lock(self, descriptor, created) -> bool:
    """Takes the lock through descriptor (True), or False to start again (the file was replaced
    meanwhile); raises WorkdirInUseError if another run holds it."""
    try:
      fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise self._in_use(self._holder_soon()) from None
    except OSError as error:
      if error.errno not in _NO_FLOCK:
        raise
      return self._lock_without_flock(descriptor, created, error)
    if not _same_file(descriptor, self.path):
      return False  # its holder removed it after we opened it: that inode locks nothing
    content = os.pread(descriptor, 4096, 0)
    if content or not created:
      self._take_over(content)
    _write_owner(descriptor, self.owner)
    return True

  def _take_over(self, content: bytes) -> None:
    """Logs whose lock is taken over; refuses (raises) one that names another host."""
    holder = self._holder_from(content)
    if holder is None:
      logging.warning('Taking over %s, which names no run (%r): a run stopped while taking it.',
                      self.path, content[:60])
    elif holder[0] != self.host:
      raise self._in_use(
          holder, f' It may run on {holder[0]} (a lock on another host cannot be '
          'checked from here).')
    else:  # the kernel says no process holds it: a live process of that number is another one
      logging.warning('Taking over %s, left by process %d, which is no longer %s.', self.path,
                      holder[1], 'holding it' if _process_alive(holder[1]) else 'running')

  @staticmethod
  def _holder_from(content: bytes):
    try:
      host, pid = content.decode('utf-8').split()[:2]
      return host, int(pid)
    except ValueError:  # also UnicodeDecodeError
      return None

  def _lock_without_flock(self, descriptor, created, error) -> bool:
    """No flocks on this filesystem: the exclusive create is the lock, and a lock file left by
    another run is never taken over (its run cannot be told dead from alive safely)."""
    logging.warning(
        '%s has no file locks (flock: %s): the lock is the file itself, and a lock '
        'left by a run that stopped must be deleted by hand.', os.path.dirname(self.path), error)
    if not created:
      raise self._in_use(self._holder(), ' (This filesystem has no file locks.)')
    _write_owner(descriptor, self.owner)
    return True

  def __exit__(self, *exc):
    if self._descriptor is None:
      return False
    try:
      if _same_file(self._descriptor, self.path):
        os.remove(self.path)  # while still holding the flock, so that no one takes this inode
    finally:
      os.close(self._descriptor)
      self._descriptor = None
    return False


def _write_owner(descriptor, owner: str) -> None:
  os.ftruncate(descriptor, 0)
  os.pwrite(descriptor, (owner + '\n').encode('utf-8'), 0)
  os.fsync(descriptor)


def _same_file(descriptor, path) -> bool:
  """Whether descriptor is still the file at path (not removed or replaced since it was opened)."""
  try:
    here = os.stat(path)
  except FileNotFoundError:
    return False
  there = os.fstat(descriptor)
  return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _process_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  except OverflowError:
    return False
  return True


# Each checkpoint's own files, with their SHA-256 and size, in a file inside the checkpoint (orbax
# ignores files it did not write there): moved aside, deleted or copied with it.
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
