"""One run: train_and_evaluate(config, workdir, data, head_phase) trains config.loss for
config.num_epochs, evaluates every epoch, checkpoints, resumes and writes results.json. It knows
no recipe phase: a head phase that a recipe puts first (Cole et al.'s linear init) comes in as
head_phase, composed above by hml_jax/training/train.py."""
import dataclasses
import logging
import time
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hml_jax import init_from
from hml_jax import methods
from hml_jax import models
from hml_jax.data import splits
from hml_jax.evaluation import false_negatives
from hml_jax.methods import losses
from hml_jax.methods import recipes
from hml_jax.runtime import console
from hml_jax.runtime import errors
from hml_jax.runtime import files
from hml_jax.state import checkpoints
from hml_jax.state import sharding
from hml_jax.state import steps
from hml_jax.state import train_state
from hml_jax.state import workdir_files
from hml_jax.training import config_checks
from hml_jax.training import input_pipeline
from hml_jax.training import loss_arguments
from hml_jax.training import preemption
from hml_jax.training import summaries


def update_pseudo_labels(eval_fn, state, data, config, epoch, mesh):
  """EM + APL after an epoch: new pseudo-labels from the predictions on the training images."""
  if epoch < config.warmup_epoch or epoch >= config.num_epochs:
    return state
  probabilities = np.asarray(
      jax.nn.sigmoid(steps.predict(eval_fn, state, data.train, config.eval_batch_size, mesh)))
  unknown_per_class = np.sum(data.train.observed == 0, axis=0)
  # The label state may be split over the devices (config.parameter_sharding='fsdp'): gathered
  # for the host computation, and put back in the same layout.
  label_state = losses.asymmetric_pseudo_labels(
      sharding.gather_to_host(state.observed_labels, mesh), probabilities, unknown_per_class,
      config.num_epochs, config.warmup_epoch, config.neg_proportion)
  logging.info('Epoch %d: %d pseudo-labels.', epoch, int(np.sum(label_state < 0)))
  return state.replace(observed_labels=sharding.place(label_state.astype(np.float32),
                                                      state.observed_labels.sharding))


def _as_percent(value):
  return None if value is None or np.isnan(value) else round(100.0 * float(value), 4)


def write_results(workdir, config, recipe, history, label_names):
  """results.json: the best epoch by validation mAP and its test mAP, plus the last epoch, the
  training recipe, whether it stopped early and the linear-init phase's results if any."""
  best = max(history['epochs'], key=lambda e: e['val_map'])
  last = history['epochs'][-1]
  results = {
      'best_epoch': best['epoch'],
      'val_map': best['val_map'],
      'test_map': best['test_map'],
      'last_test_map': last['test_map'],
      'last_val_map': last['val_map'],
      'per_class_ap': dict(zip(label_names, best['test_per_class_ap'])),
      'final_scale': last['scale'],
      'final_margin': last['margin'],
      'train_images_per_sec': history['train_images'] / max(history['train_seconds'], 1e-9),
      'wall_seconds': history['wall_seconds'],
      # Where the backbone started: a pretrained spec (config.init_from) or random weights.
      'backbone_from': config.init_from or 'random initialization',
      'recipe': dataclasses.asdict(recipe),
      'stopped_early': len(history['epochs']) < config.num_epochs,
      'linear_init': history.get('linear_init'),
      'epochs': [{
          k: v for k, v in e.items() if k != 'test_per_class_ap'
      } for e in history['epochs']],
      'config': config.to_dict(),
  }
  if jax.process_index() == 0:  # one writer; every process returns the same results
    files.write_json(files.join(workdir, 'results.json'), results, default=list)
  return results


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str,
                       data: Optional[input_pipeline.Data] = None,
                       head_phase: Optional[Callable[..., Any]] = None) -> Dict[str, Any]:
  """Trains config.loss on config.dataset, evaluates every epoch, writes workdir/results.json.
  head_phase(config, recipe, workdir, data, state, mesh) -> (state, summary): what a new run's
  state goes through before epoch 1 when the recipe has a head phase (linear_init.train_head).

  Running the same command again resumes from the newest checkpoint in workdir.
  """
  config_checks.validate_config(config)
  files.makedirs(workdir)
  if jax.process_index() > 0:  # process 0 holds the workdir's lock for all of them
    return _train_and_evaluate(config, workdir, data, head_phase)
  with checkpoints.WorkdirLock(workdir):
    return _train_and_evaluate(config, workdir, data, head_phase)


def _train_and_evaluate(config, workdir, data=None, head_phase=None):
  start_time = time.time()
  method = methods.get_method(config.loss)
  # APL's pseudo-label counts depend on num_epochs, so it cannot change when resuming.
  workdir_files.check_config(
      workdir, config,
      workdir_files.RESUMABLE_KEYS - ({'num_epochs'} if method.pseudo_labels else set()))
  starts_afresh = not workdir_files.has_checkpoint(workdir)
  if starts_afresh:
    init_from.fetch(config.init_from, config.model)
  recipe = recipes.from_config(config)
  if recipe != recipes.Recipe():
    logging.info('Training recipe of %s (config.recipe=%s): %s.', config.loss, config.recipe,
                 recipe.describe())
  if data is None:
    data = input_pipeline.load(config)

  mesh = sharding.create_mesh()
  dtype = jnp.bfloat16 if config.half_precision else jnp.float32
  model = models.create_model(config.model,
                              method.head,
                              len(data.label_names),
                              dtype=dtype,
                              convolutions=config.convolutions)
  # The layout of the state (config.parameter_sharding) is known before the state exists: a
  # resumed run restores straight into it, without initializing (or gathering) anything first.
  settings = steps.StepSettings.from_config(config)
  state_shapes = train_state.train_state_shapes(settings.state,
                                                model,
                                                method,
                                                data.train.example_shape,
                                                observed_labels=data.train.observed)

  history = {'epochs': [], 'train_images': 0, 'train_seconds': 0.0, 'wall_seconds': 0.0}
  manager = checkpoints.Checkpointer(workdir, keep=config.checkpoints_to_keep)
  restored = manager.restore_latest(
      sharding.abstract_arrays(
          state_shapes, train_state.train_state_shardings(settings.state, state_shapes, mesh)))
  partial = None
  data_fingerprint = input_pipeline.fingerprint(data)
  if restored is None:
    state = train_state.create_train_state(settings.state,
                                           model,
                                           method,
                                           jax.random.key(config.seed),
                                           data.train.example_shape,
                                           observed_labels=data.train.observed,
                                           backbone=init_from.initial_backbone(
                                               config.init_from, config.model, model,
                                               data.train.example_shape))
    state = sharding.place(state, train_state.train_state_shardings(settings.state, state, mesh))
  if restored is None and jax.process_index() == 0:
    workdir_files.write_config(workdir, config)
    workdir_files.write_dataset_info(workdir,
                                     data.label_names,
                                     data.train.example_shape,
                                     len(data.train),
                                     data_fingerprint,
                                     digests=data.digests)
    if data.feature_statistics is not None:
      # What config.dataset.standardize did, for whoever applies the head to other features.
      files.write_json(files.join(workdir, 'feature_statistics.json'), {
          key: value.tolist() for key, value in data.feature_statistics.items()
      })
  elif restored is not None:
    workdir_files.check_dataset(workdir, data_fingerprint)
    if jax.process_index() == 0:
      # A resumed run may be made longer (num_epochs is resumable): config.json then records the
      # run's length as it is now, so that an export of it names the config that makes it. The
      # other resumable keys (paths, layout) keep the first run's record.
      workdir_files.record_num_epochs(workdir, config.num_epochs)
    state, history = restored
    partial = history.pop('partial', None)
    logging.info(
        'Resumed from epoch %d%s in %s.', len(history['epochs']),
        f" and {len(partial['step_metrics'])} steps of epoch {partial['epoch']}" if partial else '',
        workdir)
  if restored is None and recipe.linear_init_epochs > 0:
    if head_phase is None:
      raise errors.InvalidInputError(
          f'The recipe of {config.loss!r} starts with a head phase (linear_init_epochs='
          f'{recipe.linear_init_epochs}): train it with hml_jax.training.train.train_and_evaluate, which '
          'runs the phases, or set --config.linear_init_epochs=0.')
    state, history['linear_init'] = head_phase(config, recipe, workdir, data, state, mesh)
  first_epoch = len(history['epochs']) + 1
  if first_epoch > config.num_epochs or stops_early(recipe, history):
    logging.info('All %d epochs are done in %s; rewriting results.json only.',
                 len(history['epochs']), workdir)
    return write_results(workdir, config, recipe, history, data.label_names)

  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  if absl_logging.vlog_is_on(1) and jax.process_index() == 0:
    # clu's table of every parameter's shape and size (its TensorBoard writers are not used:
    # they import TensorFlow).
    from clu import parameter_overview  # pylint: disable=g-import-not-at-top
    # Shapes only: the parameters may be split over other processes' devices.
    parameter_overview.log_parameter_overview(state.params['model'], include_stats=False)
  hyperparameters = loss_arguments.loss_hyperparameters(method, config, data.train.labels)
  # From the state itself: a pytree of shardings must match the state's tree, whose static part
  # (the optimizer's functions) differs between two create_train_state calls.
  train_fn, eval_fn = steps.make_step_functions(
      method, settings, mesh, hyperparameters,
      train_state.train_state_shardings(settings.state, state, mesh))

  steps_per_epoch = splits.num_train_steps_per_epoch(data.train, config.batch_size)
  if steps_per_epoch == 0:
    raise errors.InvalidInputError(f'The training split has {len(data.train)} images, fewer than '
                                   f'config.batch_size={config.batch_size}.')
  writer = metric_writer(workdir)
  if restored is None and jax.process_index() == 0:
    writer.write_hparams({
        k: v
        for k, v in workdir_files.flatten(config.to_dict()).items()
        if isinstance(v, (int, float, str, bool))
    })
  report_progress = summaries.ProgressReport(steps_per_epoch * config.num_epochs, writer)

  loop = EpochLoop(method=method,
                   config=config,
                   settings=settings,
                   data=data,
                   mesh=mesh,
                   train_fn=train_fn,
                   eval_fn=eval_fn,
                   manager=manager,
                   writer=writer,
                   report_progress=report_progress,
                   steps_per_epoch=steps_per_epoch,
                   progress_bar=console.ProgressBar(enabled=jax.process_index() == 0))
  try:  # a preempted or failed run keeps the events written so far
    with preemption.Guard() as loop.guard:
      for epoch in range(first_epoch, config.num_epochs + 1):
        loop.started = start_time  # the wall time since then counts in this epoch's line
        state, history = loop.run_epoch(epoch, state, history,
                                        partial if epoch == first_epoch else None)
        history['wall_seconds'] += time.time() - start_time
        start_time = time.time()
        if stops_early(recipe, history):
          logging.info('Early stopping after epoch %d of %d (%s); the best epoch is kept.', epoch,
                       config.num_epochs, recipe.describe())
          break
  finally:
    writer.close()
  manager.wait()
  return write_results(workdir, config, recipe, history, data.label_names)


def metric_writer(workdir):
  """TensorBoard event files in workdir (process 0); the per-step metrics reach the console too
  only with --verbosity=1 (absl), so that a run prints one line per epoch."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  return summaries.EventWriter(workdir,
                               enabled=jax.process_index() == 0,
                               log_scalars=absl_logging.vlog_is_on(1))


def stops_early(recipe, history) -> bool:
  return recipes.should_stop(recipe, [epoch['val_map'] for epoch in history['epochs']])


@dataclasses.dataclass
class EpochLoop:
  """What every epoch of one run uses: the method, config, data and mesh, the jitted steps, the
  checkpoints, the metric writer and progress report, and the preemption guard."""
  method: Any
  config: Any
  settings: steps.StepSettings
  data: Any
  mesh: Any
  train_fn: Any
  eval_fn: Any
  manager: Any
  writer: Any
  report_progress: Any
  steps_per_epoch: int
  progress_bar: Any = None
  guard: Any = None
  started: float = 0.0  # time.time() from which this epoch's wall time counts

  def run_epoch(self, epoch, state, history, partial=None):
    """One epoch: train, (pseudo-labels,) evaluate, record, checkpoint. partial: the steps of
    this epoch done before a preemption. Returns (state, history)."""
    method, config, data, mesh = self.method, self.config, self.data, self.mesh

    def save_partial(state, step_metrics, step):
      self.manager.save_preempted(step, state, {
          **history, 'partial': {
              'epoch': epoch,
              'step_metrics': step_metrics
          }
      })

    state, train_summary = self.train(epoch, state, partial, save_partial)
    seconds, images = train_summary.pop('seconds'), train_summary.pop('images')
    history['train_seconds'] += seconds
    history['train_images'] += images
    train_summary['images_per_second'] = images / max(seconds, 1e-9)
    if method.pseudo_labels:
      state = update_pseudo_labels(self.eval_fn, state, data, config, epoch, mesh)
    validation = steps.evaluate(self.eval_fn, state, data.validation, config.eval_batch_size, mesh)
    test = steps.evaluate(self.eval_fn, state, data.test, config.eval_batch_size, mesh)
    # s and m of the margin sigmoid (learned s*, m* for 'hml'); a linear head has none. Scalars,
    # so replicated and readable on every process (the other parameters may be split over
    # processes' devices, which jax.device_get of all of them would refuse).
    scale, margin = ((
        float(x) for x in train_state.scale_and_margin(state.params, self.settings.state, method))
                     if method.has_scale_and_margin else (None, None))
    steps_per_epoch = self.steps_per_epoch
    record = {
        'epoch': epoch,
        'step': epoch * steps_per_epoch,
        'train_loss': train_summary['loss'],
        'train_bce': train_summary['bce'],
        # Summed over the epoch's steps: paper Fig. 3's accumulated gradients.
        'positive_gradient': train_summary['positive_gradient'] * steps_per_epoch,
        'negative_gradient': train_summary['negative_gradient'] * steps_per_epoch,
        'val_map': _as_percent(validation['map']),
        'test_map': _as_percent(test['map']),
        'scale': scale,
        'margin': margin,
        'skipped_steps': train_summary['skipped_steps'],
        'test_per_class_ap': [_as_percent(v) for v in test['per_class_ap']]
    }
    if config.false_negative_images:
      record.update(self.false_negatives(state, scale, margin))
    elapsed = history['wall_seconds'] + time.time() - self.started
    self.writer.write_scalars(
        record['step'],
        summaries.epoch_scalars(record,
                                console.eta_seconds(epoch, elapsed, config.num_epochs - epoch)))
    logging.info(
        '%s',
        console.epoch_line(epoch, config.num_epochs, record['train_loss'], record['val_map'],
                           record['test_map'], scale, margin, train_summary['images_per_second'],
                           elapsed, config.num_epochs - epoch))
    # Strictly better, so that a tie keeps the earlier epoch (as max() in write_results does).
    is_best = all(record['val_map'] > e['val_map'] for e in history['epochs'])
    history['epochs'].append(record)
    self.manager.save(epoch, state, history, is_best=is_best)
    return state, history

  def false_negatives(self, state, scale, margin):
    """false_negatives.summary on the first config.false_negative_images training images
    (in evaluation order, unaugmented): paper Fig. 2's quantities, per epoch."""
    config, split = self.config, self.data.train
    outputs, rows = steps.model_outputs(state,
                                        self.settings,
                                        split,
                                        self.mesh,
                                        config.eval_batch_size,
                                        max_images=config.false_negative_images)
    linear = scale is None  # a linear head: its outputs are the logits
    return false_negatives.summary(self.method, outputs, split.labels[rows], split.observed[rows],
                                   1.0 if linear else scale, 0.0 if linear else margin,
                                   config.margin_on)

  def train(self, epoch, state, partial=None, save_partial=None):
    """Runs one epoch of train steps; returns (state, summary of the epoch's mean metrics, plus
    'seconds' and 'images' trained after the first step, which may include compilation, and
    'skipped_steps').

    partial: {'step_metrics': [...]} of the steps of this epoch done before a preemption: they
    are skipped (the data order is a function of (seed, epoch)) and count in the summary. When
    the guard says stop, save_partial(state, step_metrics, step) writes a checkpoint and
    Preempted is raised.
    """
    method, config, split, mesh = self.method, self.config, self.data.train, self.mesh
    steps_per_epoch = splits.num_train_steps_per_epoch(split, config.batch_size)
    schedule = loss_arguments.epoch_schedule(method, config, epoch,
                                             config.batch_size * split.labels.shape[1])
    if schedule:
      logging.info('Epoch %d schedule: %s', epoch, schedule)
    schedule = {key: jnp.asarray(value) for key, value in schedule.items()}
    names = parameter_names(state.params)
    done = list(partial['step_metrics']) if partial else []
    pending, timer_start, timed_images = [], None, 0

    def fetch():
      fetched = jax.device_get(pending)
      pending.clear()
      fetched = [(step, {
          key: float(value) for key, value in metrics.items()
      }) for step, metrics in fetched]
      check_finite(fetched, config, names)
      done.extend(metrics for _, metrics in fetched)
      return fetched

    batches = split.train_batches(config.batch_size, config.seed, epoch, start_step=len(done))
    bar = self.progress_bar or console.ProgressBar(enabled=False)
    bar.start(f'Epoch {epoch}/{config.num_epochs}', steps_per_epoch)
    for index, batch in enumerate(batches, start=len(done)):
      step = (epoch - 1) * steps_per_epoch + index + 1
      state, metrics = self.train_fn(state, sharding.shard_batch(batch, mesh), schedule)
      pending.append((step, metrics))
      if timer_start is None:
        jax.block_until_ready(metrics)
        timer_start = time.time()
      else:
        timed_images += config.batch_size
      self.report_progress(step, time.time())
      bar.update(index + 1, config.batch_size)
      if step % config.log_every_steps == 0:
        # Also bounds the queued steps.
        self.writer.write_scalars(step, summaries.step_scalars(fetch()[-1][1]))
      if self.guard is not None and self.guard.should_stop(step):
        fetch()
        save_partial(state, done, step)
        raise preemption.Preempted(step, self.guard.signal_name)
    fetch()
    bar.clear()
    summary = {
        key: float(np.mean([m[key]
                            for m in done])) for key in done[0] if key != 'first_nonfinite_gradient'
    }
    summary['skipped_steps'] = int(sum(m['nonfinite'] for m in done))
    summary.update(seconds=time.time() - (timer_start or time.time()), images=timed_images)
    return state, summary


def parameter_names(params):
  """'model/backbone/conv1/kernel', ... in tree_leaves order (that of the gradients)."""
  return [
      '/'.join(str(getattr(key, 'key', key))
               for key in path)
      for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
  ]


def check_finite(fetched, config, names):
  """fetched: [(step, host metrics)]. With config.nonfinite = 'stop', the first step whose loss
  or gradient was NaN or Inf (the train step left the state unchanged) stops training."""
  for step, metrics in fetched:
    if metrics['nonfinite'] and config.nonfinite == 'stop':
      leaf = int(metrics['first_nonfinite_gradient'])
      quantity = 'the loss' if leaf < 0 else f'the gradient of {names[leaf]}'
      raise errors.TrainingDivergedError(
          f'Step {step}: {quantity} is NaN or Inf. The step was not applied and no checkpoint '
          'was written after the last finished epoch, which the same command resumes from. '
          'Lower config.learning_rate, or set config.nonfinite=skip to skip such steps (they '
          'are counted as skipped_steps).')
