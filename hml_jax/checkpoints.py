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

import flax
import jax
import ml_collections
import orbax.checkpoint as ocp

# Keys that may change when a run is resumed: they do not change what has been computed.
# Where the data lives and how many threads read it are not part of what is computed either.
RESUMABLE_KEYS = frozenset({'num_epochs', 'log_every_steps', 'checkpoints_to_keep',
                            'eval_batch_size', 'dataset.data_dir', 'dataset.manual_dir',
                            'dataset.parallel_calls'})


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
  return os.path.join(workdir, 'config.json')


def check_config(workdir: str, config: ml_collections.ConfigDict,
                 resumable_keys=RESUMABLE_KEYS) -> None:
  """Refuses a workdir whose run used an incompatible config (and changes nothing in it)."""
  path = config_path(workdir)
  has_checkpoint = os.path.isdir(os.path.join(workdir, 'checkpoints')) and any(
      name.isdigit() for name in os.listdir(os.path.join(workdir, 'checkpoints')))
  if not os.path.exists(path):
    if has_checkpoint:
      raise ValueError(f'{workdir} holds checkpoints but no config.json: it was not made by this '
                       'version of hml_jax. Use another --workdir.')
    return
  with open(path) as f:
    saved = flatten(json.load(f))
  current = flatten(json.loads(config.to_json()))
  differences = [f'{key}: {saved.get(key, "<absent>")!r} in the workdir, '
                 f'{current.get(key, "<absent>")!r} now'
                 for key in sorted(set(saved) | set(current))
                 if key not in resumable_keys and saved.get(key) != current.get(key)]
  if differences:
    raise ValueError(f'{workdir} holds a run made with a different config, so it cannot be '
                     'resumed; use another --workdir (nothing was changed). Differences:\n  ' +
                     '\n  '.join(differences))


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  path = config_path(workdir)
  with open(path + '.tmp', 'w') as f:  # never a half-written config.json
    f.write(config.to_json(indent=2))
  os.replace(path + '.tmp', path)


def dataset_info_path(workdir):
  return os.path.join(workdir, 'dataset.json')


def write_dataset_info(workdir: str, label_names, example_shape, num_train: int,
                       fingerprint: str = '') -> None:
  """workdir/dataset.json: what a trained model needs without the data (label names for
  predictions, the input shape and the training split's size for restoring the state), and a
  fingerprint of the labels that resuming checks."""
  path = dataset_info_path(workdir)
  with open(path + '.tmp', 'w') as f:
    json.dump({'label_names': list(label_names), 'example_shape': list(example_shape),
               'num_train': int(num_train), 'fingerprint': fingerprint}, f, indent=2)
  os.replace(path + '.tmp', path)


def check_dataset(workdir: str, fingerprint: str) -> None:
  """Refuses to resume on other data (an edited CSV, another prepared dataset) than the run
  started with: the rows would silently change meaning."""
  path = dataset_info_path(workdir)
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f).get('fingerprint')
  if saved and saved != fingerprint:
    raise ValueError(f'The data differs from the data {workdir} was trained on (label '
                     f'fingerprint {fingerprint[:12]} now, {saved[:12]} in {path}), so the run '
                     'cannot be resumed; restore that data or use another --workdir.')


def read_dataset_info(workdir: str):
  """dataset.json of a run; runs made before it existed are read from their TFDS builder."""
  path = dataset_info_path(workdir)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  with open(config_path(workdir)) as f:
    config = ml_collections.ConfigDict(json.load(f))
  from hml_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  builder = input_pipeline.load_tfds_builder(config.dataset)
  num_train = builder.info.splits['train'].num_examples
  num_train -= int(round(config.validation_fraction * num_train))
  return {'label_names': list(builder.info.metadata['label_names']),
          'example_shape': list(builder.info.features['image'].shape), 'num_train': num_train}


class Checkpointer:
  """Latest and best checkpoints of one run."""

  def __init__(self, workdir: str, keep: int):
    options = dict(create=True, enable_async_checkpointing=False)
    # Synchronous saves: the train step donates the state's buffers, so a background copy of them
    # could race with the next step.
    self.latest = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), 'checkpoints'),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, **options))
    self.best = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), 'best'),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, **options))

  @staticmethod
  def _args(state, history):
    return ocp.args.Composite(state=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
                              history=ocp.args.JsonSave(history))

  def save(self, epoch: int, state, history, is_best: bool) -> None:
    # Best first: a crash between the two saves then repeats this epoch on resume (and replaces
    # its best checkpoint) instead of resuming past an epoch whose best checkpoint is missing.
    if is_best:
      if epoch in self.best.all_steps():
        self.best.delete(epoch)
      self.best.save(epoch, args=self._args(state, history))
    self.latest.save(epoch, args=self._args(state, history))

  def _restore(self, manager, step, state):
    target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                    flax.serialization.to_state_dict(state))
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), history=ocp.args.JsonRestore()))
    return flax.serialization.from_state_dict(state, restored['state']), restored['history']

  def restore_latest(self, state):
    """(state, history) of the newest checkpoint, or None if there is none."""
    step = self.latest.latest_step()
    if step is None:
      return None
    return self._restore(self.latest, step, state)

  def restore_best(self, state):
    step = self.best.latest_step()
    if step is None:
      return None
    return self._restore(self.best, step, state)

  def wait(self):
    self.latest.wait_until_finished()
    self.best.wait_until_finished()
