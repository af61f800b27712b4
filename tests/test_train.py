import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from hml_jax import methods, models
from hml_jax.methods import losses
from hml_jax.state import checkpoints, steps, train_state
from hml_jax.training import loss_arguments, train

from helpers import read_results, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def features(rng):
  """Inputs of the identity backbone: 16 random feature vectors of 32 dimensions."""
  return rng.normal(size=(16, 32)).astype(np.float32)


def random_batch(inputs):
  """One batch of inputs(rng) and random labels (16 images, 10 labels), from RandomState(0)."""
  rng = np.random.RandomState(0)
  return {
      'images': inputs(rng),
      'labels': (rng.uniform(size=(16, 10)) < 0.3).astype(np.int32),
      'indices': np.arange(16, dtype=np.int32)
  }


def _train_steps(loss, model_name, inputs, num_steps=20):
  """(first, last) metrics of num_steps jitted train steps of config.loss=loss on
  random_batch(inputs), the final state and the batch."""
  config = tiny_config('unused', loss=loss, learning_rate=1e-2)
  method = methods.get_method(loss)
  model = models.create_model(model_name, method.head, num_labels=10)
  batch = random_batch(inputs)
  state = train_state.create_train_state(train_state.StateSettings.from_config(config),
                                         model,
                                         method,
                                         jax.random.key(0),
                                         batch['images'].shape[1:],
                                         observed_labels=batch['labels'])
  hyperparameters = loss_arguments.loss_hyperparameters(method, config, batch['labels'])
  # Epoch 3, so that schedules that start at epoch 2 (Large Loss) act.
  schedule = loss_arguments.epoch_schedule(method, config, 3, batch['labels'].size)
  step = jax.jit(lambda s, b: steps.train_step(s,
                                               b,
                                               schedule,
                                               method=method,
                                               settings=steps.StepSettings.from_config(config),
                                               hyperparameters=hyperparameters))
  state, first = step(state, batch)
  for _ in range(num_steps):
    state, last = step(state, batch)
  return first, last, state, batch


@pytest.mark.slow
@pytest.mark.parametrize('loss', ['an', 'hml'])
def test_train_step_on_tiny_resnet_lowers_the_loss(loss):
  first, last, _, _ = _train_steps(
      loss, 'resnet_tiny', lambda rng: rng.randint(0, 256, (16, 32, 32, 1)).astype(np.uint8))
  assert np.isfinite(float(last['grad_norm']))
  key = 'bce' if loss == 'hml' else 'loss'
  assert float(last[key]) < 0.7 * float(first[key])


@pytest.mark.parametrize('loss', sorted(methods.METHODS))
def test_train_step_of_every_method_lowers_the_loss(loss):
  """Every method's step on features (the identity backbone: the methods differ in their head and
  loss only, and a ResNet would add seconds of compile time per method)."""
  first, last, state, batch = _train_steps(loss, 'identity', features)
  assert np.isfinite(float(last['loss'])) and np.isfinite(float(last['grad_norm']))
  if loss == 'hml':
    # The total also holds the adaptive term, which trains only s* and m* and may rise while the
    # network fits: the BCE is what trains the network.
    assert float(last['bce']) < 0.7 * float(first['bce'])
    assert float(last['scale']) != 20.0 and float(last['margin']) != np.float32(0.3)
  else:
    # Relative to |loss|: EM's loss is negative (it maximizes entropy), label smoothing has a floor.
    assert float(last['loss']) < float(first['loss']) - 0.1 * abs(float(first['loss']))
  if loss in ('hml_fixed', 'normalized_sigmoid'):
    assert float(last['scale']) == 20.0
    assert float(last['margin']) == (0.0 if loss == 'normalized_sigmoid' else np.float32(0.3))
  if methods.get_method(loss).head == 'linear':
    assert 'scale' not in last
  if methods.get_method(loss).updates_labels:  # LL-Cp turned some unobserved labels positive
    assert int(np.asarray(state.observed_labels).sum()) > int(batch['labels'].sum())
    assert np.all(np.asarray(state.observed_labels) >= batch['labels'])


def _hml_steps(config, num_steps, margin_push=0.0):
  """(state, metrics) after num_steps train steps of adaptive HML on one fixed random batch.
  margin_push: added to the loss times m*, a gradient that drives m* upwards."""
  method = methods.get_method('hml')
  if margin_push:
    pushed = methods.Method(
        **{
            **method.__dict__, 'loss':
                lambda cos, labels, scale, margin, **kwargs: losses.hml(
                    cos, labels, scale, margin, **kwargs) - margin_push * margin
        })
    method = pushed
  # On features (the identity backbone): s* and m* see only the cosines, and a ResNet would add
  # seconds of compile time per call.
  model = models.create_model('identity', method.head, num_labels=10)
  batch = random_batch(features)
  state = train_state.create_train_state(train_state.StateSettings.from_config(config), model,
                                         method, jax.random.key(0), (32,))
  step = jax.jit(lambda s, b: steps.train_step(s,
                                               b, {},
                                               method=method,
                                               settings=steps.StepSettings.from_config(config),
                                               hyperparameters={'margin_on': 'both'}))
  for _ in range(num_steps):
    state, metrics = step(state, batch)
  return state, metrics


def test_adaptive_optimizer_shared_uses_the_network_learning_rate():
  """'shared' gives s*, m* the network's Adam step; 'separate' its own rate, so that at equal
  rates (the default config: 1e-3 and 1e-3) the two are the same optimizer, bit for bit."""
  separate, _ = _hml_steps(
      tiny_config('unused',
                  learning_rate=1e-3,
                  adaptive_optimizer='separate',
                  adaptive_learning_rate=1e-3), 5)
  shared, _ = _hml_steps(tiny_config('unused', learning_rate=1e-3, adaptive_optimizer='shared'), 5)
  for a, b in zip(jax.tree_util.tree_leaves(separate.params),
                  jax.tree_util.tree_leaves(shared.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # At the paper configs' 1e-5, 'shared' moves m* about 1e-5 per step (Adam's step is about the
  # learning rate), 'separate' about 1e-3.
  config = tiny_config('unused',
                       learning_rate=1e-5,
                       adaptive_learning_rate=1e-3,
                       adaptive_optimizer='separate')
  separate, _ = _hml_steps(config, 5)
  config.adaptive_optimizer = 'shared'
  shared, _ = _hml_steps(config, 5)
  moved = {
      name: abs(float(state.params['scale_margin']['margin']) - np.float32(0.3))
      for name, state in (('separate', separate), ('shared', shared))
  }
  assert 1e-3 < moved['separate'] <= 5.01e-3 and 1e-5 < moved['shared'] <= 5.01e-5, moved


@pytest.mark.parametrize('scale', [5.0, 40.0])
def test_log_optimizer_moves_the_scale_by_a_factor_whatever_its_size(scale):
  """'log' (the default): Adam in log s, so each step multiplies s* by about exp(+-lr) from a
  small or a large start alike (plain Adam moves it by about lr, 1e-2 of 40 is 0.03%), and m* by
  plain Adam steps of about lr."""
  config = tiny_config('unused', learning_rate=1e-3, adaptive_learning_rate=1e-2, scale=scale)
  state, _ = _hml_steps(config, 5)
  factor = float(state.params['scale_margin']['scale']) / scale
  assert 0.02 < abs(np.log(factor)) <= 0.06, factor  # Adam: about lr per step, a little more
  assert abs(float(state.params['scale_margin']['margin']) - np.float32(0.3)) <= 0.06
  config.adaptive_optimizer = 'separate'
  plain, _ = _hml_steps(config, 5)
  assert abs(float(plain.params['scale_margin']['scale']) - scale) <= 0.06


def test_learned_margin_stays_where_the_margin_map_increases():
  """However hard the loss pushes m*, it never leaves [-2.3311, 2.3311] (heads.cos_with_margin
  is increasing in c only for |m| <= 2.33112)."""
  config = tiny_config('unused', learning_rate=1e-3, adaptive_learning_rate=0.5, margin=2.2)
  state, metrics = _hml_steps(config, 4, margin_push=100.0)
  margin = float(state.params['scale_margin']['margin'])
  assert margin == float(np.float32(2.3311)) and float(metrics['margin']) == margin
  assert margin < 2.3311223704  # heads.MONOTONIC_MARGIN_LIMIT
  config.margin = -2.2
  state, _ = _hml_steps(config, 4, margin_push=-100.0)
  assert float(state.params['scale_margin']['margin']) == -float(np.float32(2.3311))


@pytest.mark.slow
def test_end_to_end_writes_results_and_resumes_exactly(tfds_dir, tmp_path):
  uninterrupted = tmp_path / 'uninterrupted'
  results = train.train_and_evaluate(tiny_config(tfds_dir, num_epochs=3), str(uninterrupted))
  for key in ('best_epoch', 'val_map', 'test_map', 'last_test_map', 'per_class_ap',
              'train_images_per_sec', 'wall_seconds', 'config'):
    assert key in results
  assert results['test_map'] == results['epochs'][results['best_epoch'] - 1]['test_map']
  assert results['val_map'] == max(e['val_map'] for e in results['epochs'])
  assert set(results['per_class_ap']) == set('0123456789')
  assert 0 < results['test_map'] <= 100
  assert os.path.isdir(uninterrupted / 'best' / str(results['best_epoch']))
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(uninterrupted))
  config, method, best = train_state.load_trained_state(str(uninterrupted), 'best')
  steps_per_epoch = results['epochs'][0]['step']
  assert int(best.step) == results['best_epoch'] * steps_per_epoch
  assert method.head == 'cosine' and config.loss == 'hml'
  np.testing.assert_allclose(best.params['scale_margin']['margin'],
                             results['epochs'][results['best_epoch'] - 1]['margin'])

  # Stop after epoch 1 (as if killed after its checkpoint), then run the 3-epoch command again.
  resumed = tmp_path / 'resumed'
  train.train_and_evaluate(tiny_config(tfds_dir, num_epochs=1), str(resumed))
  train.train_and_evaluate(tiny_config(tfds_dir, num_epochs=3), str(resumed))
  assert read_results(resumed) == read_results(uninterrupted)
  assert final_state(resumed) == final_state(uninterrupted)


class Killed(Exception):
  pass


@pytest.mark.parametrize('loss', ['ll_cp', 'role', 'em_apl'])
@pytest.mark.slow
def test_method_state_survives_resuming(tfds_dir, tmp_path, monkeypatch, loss):
  """LL-Cp's corrected labels, ROLE's label estimator and APL's pseudo-labels are state: a run
  killed right after its epoch-2 checkpoint resumes to the same end as an uninterrupted run."""
  uninterrupted, resumed = tmp_path / 'uninterrupted', tmp_path / 'resumed'
  config = tiny_config(tfds_dir, loss=loss, delta_rel=2.0, warmup_epoch=1, num_epochs=3)
  train.train_and_evaluate(config, str(uninterrupted))
  save = checkpoints.Checkpointer.save

  def save_then_die(self, epoch, *args, **kwargs):
    save(self, epoch, *args, **kwargs)
    if epoch == 2:
      raise Killed()

  monkeypatch.setattr(checkpoints.Checkpointer, 'save', save_then_die)
  with pytest.raises(Killed):
    train.train_and_evaluate(config, str(resumed))
  monkeypatch.setattr(checkpoints.Checkpointer, 'save', save)
  train.train_and_evaluate(config, str(resumed))
  assert read_results(resumed) == read_results(uninterrupted)
  assert final_state(resumed) == final_state(uninterrupted)
  _, _, state = train_state.load_trained_state(str(uninterrupted), 'latest')
  if loss == 'll_cp':
    observed = np.asarray(state.observed_labels)
    # Single positive labels: one per image before; LL-Cp added some from epoch 2 on.
    assert observed.sum() > observed.shape[0]
  elif loss == 'em_apl':
    # Pseudo-labels after epochs 1 and 2: int(0.9 * unknown / (3 - 1)) per class and pass.
    assert np.sum(np.asarray(state.observed_labels) < 0) > 0
  else:
    estimator = np.asarray(state.params['estimator'])
    assert estimator.shape == (192, 10)
    # It was trained: no observed positive keeps its initial logit(0.995).
    assert not np.any(np.isclose(estimator, np.log(0.995 / 0.005), rtol=1e-6))


def final_state(workdir):
  """The newest checkpoint's train state, every array as bytes (for exact comparison)."""
  _, _, state = train_state.load_trained_state(str(workdir), 'latest')
  return jax.tree_util.tree_map(
      lambda x: np.asarray(x).tobytes(), {
          'params': state.params,
          'stats': state.batch_stats,
          'opt': state.opt_state,
          'step': state.step,
          'labels': state.observed_labels
      })


def run_cli(workdir, tfds_dir, *extra):
  return [
      sys.executable, '-m', 'hml_jax.main', '--config=configs/tiny.py', f'--workdir={workdir}',
      f'--config.dataset.data_dir={tfds_dir}', *extra
  ]


@pytest.mark.slow
def test_cli_output_is_one_line_per_epoch(tfds_dir, tmp_path):
  """Redirected to a file: a line per epoch, no per-step metric dump, no library banner;
  --verbosity=1 adds the per-step metrics (they always go to TensorBoard)."""
  quiet = subprocess.run(run_cli(tmp_path / 'quiet', tfds_dir, '--config.num_epochs=2'),
                         cwd=ROOT,
                         check=True,
                         capture_output=True,
                         text=True)
  output = quiet.stdout + quiet.stderr
  epochs = [line for line in output.splitlines() if '] Epoch ' in line]
  assert len(epochs) == 2 and 'Epoch 2/2: loss ' in epochs[1] and 'img/s' in epochs[1]
  assert 'ETA' in epochs[0]
  assert "Unable to initialize backend 'tpu'" not in output
  # Only hml_jax's own lines: no TensorFlow banner, no TFDS note (absl's lines start I/W/E + date).
  assert 'oneDNN' not in output and 'absl::InitializeLog' not in output, output
  assert 'dataset_info.json' not in output, output
  assert 'positive_gradient' not in output  # a per-step metric
  assert len(output.splitlines()) <= 20, output
  assert list((tmp_path / 'quiet').glob('events.out.tfevents.*'))
  verbose = subprocess.run(run_cli(tmp_path / 'verbose', tfds_dir, '--config.num_epochs=1',
                                   '--config.log_every_steps=1', '--verbosity=1'),
                           cwd=ROOT,
                           check=True,
                           capture_output=True,
                           text=True)
  assert 'positive_gradient' in verbose.stdout + verbose.stderr


@pytest.mark.slow
def test_incompatible_workdir_is_refused_and_left_untouched(tfds_dir, tmp_path):
  workdir = tmp_path / 'run'
  train.train_and_evaluate(tiny_config(tfds_dir, num_epochs=1), str(workdir))
  before = {path: os.path.getmtime(path) for path in workdir.rglob('*')}
  with pytest.raises(ValueError,
                     match=r"(?s)different config.*loss: 'hml' in the workdir, "
                     r"'an' now"):
    train.train_and_evaluate(tiny_config(tfds_dir, num_epochs=1, loss='an'), str(workdir))
  assert {path: os.path.getmtime(path) for path in workdir.rglob('*')} == before


@pytest.mark.parametrize('key,value,message', [
    ('loss', 'hmll', "Unknown loss 'hmll'"),
    ('label_scenario', 'single', "Unknown label scenario 'single'"),
    ('model', 'resnet51', "Unknown model 'resnet51'"),
    ('batch_size', 0, 'config.batch_size=0'),
    ('positive_fraction', 0.0, r"config.positive_fraction=0.0: scenario 'partial_positive'"),
    ('margin', 2.5, r'config.margin=2.5: beyond \|m\| = 2.3311 rad'),
    ('adaptive_optimizer', 'joint', r"config.adaptive_optimizer='joint'.*'log', 'separate'"),
    ('adaptive_scale', 'ratio', r"config.adaptive_scale='ratio'.*'spread', 'balance'"),
    ('logit_spread', 0.0, r'config.logit_spread=0.0 must be positive'),
    ('init_from', 'torchvision:resnet50', r"weights of resnet50, but config.model is "
     r"'resnet_tiny'"),
    ('image_size', 48, 'config.image_size is 48'),
    ('dataset.mean', (0.485, 0.456, 0.406), 'config.dataset.mean has 3 values'),
])
def test_bad_config_values_are_named(tfds_dir, tmp_path, key, value, message):
  config = tiny_config(tfds_dir)
  if key == 'positive_fraction':
    config.label_scenario = 'partial_positive'
  if '.' in key:
    group, key = key.split('.')
    config[group][key] = value
  else:
    config[key] = value
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run' / 'config.json').exists()


@pytest.mark.slow
def test_unknown_config_key_is_rejected_by_the_cli(tfds_dir, tmp_path):
  result = subprocess.run(run_cli(tmp_path / 'run', tfds_dir, '--config.lerning_rate=0.1'),
                          cwd=ROOT,
                          capture_output=True,
                          text=True)
  assert result.returncode != 0
  assert 'lerning_rate' in result.stderr
  assert not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_pseudo_label_runs_cannot_change_num_epochs_on_resume(tfds_dir, tmp_path):
  train.train_and_evaluate(tiny_config(tfds_dir, loss='em_apl', num_epochs=1), str(tmp_path))
  with pytest.raises(ValueError, match='num_epochs: 1 in the workdir, 2 now'):
    train.train_and_evaluate(tiny_config(tfds_dir, loss='em_apl', num_epochs=2), str(tmp_path))


def test_learning_rate_factor_is_the_step_schedule():
  assert [steps.learning_rate_factor(epoch, (2, 4), 0.1) for epoch in range(1, 7)
         ] == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
  assert steps.learning_rate_factor(9, (), 0.1) == 1.0


def test_learning_rate_factor_steps_as_adam_at_that_rate():
  """Three steps with the factor 0.1 on the network are three steps of Adam at a tenth of the
  rate (an independent run at that rate), and the factor applies to the network only."""
  batch = random_batch(features)
  method = methods.get_method('hml')
  model = models.create_model('identity', method.head, num_labels=10)

  def run(learning_rate, schedule):
    config = tiny_config('unused', loss='hml', learning_rate=learning_rate)
    state = train_state.create_train_state(train_state.StateSettings.from_config(config), model,
                                           method, jax.random.key(0), (32,))
    hyperparameters = loss_arguments.loss_hyperparameters(method, config, batch['labels'])
    step = jax.jit(lambda s, b: steps.train_step(s,
                                                 b,
                                                 schedule,
                                                 method=method,
                                                 settings=steps.StepSettings.from_config(config),
                                                 hyperparameters=hyperparameters))
    for _ in range(3):
      state, _ = step(state, batch)
    return state.params

  scaled = run(1e-2, {steps.LEARNING_RATE_FACTOR: np.float32(0.1)})
  slower = run(1e-3, {})
  faster = run(1e-2, {})
  for a, b in zip(jax.tree_util.tree_leaves(scaled['model']),
                  jax.tree_util.tree_leaves(slower['model'])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert not np.allclose(
      jax.tree_util.tree_leaves(scaled['model'])[0],
      jax.tree_util.tree_leaves(faster['model'])[0])
  # The factor 0 freezes the network only: s* still moves at its own rate.
  frozen = run(1e-2, {steps.LEARNING_RATE_FACTOR: np.float32(0.0)})
  initial = train_state.create_train_state(
      train_state.StateSettings.from_config(tiny_config('unused', loss='hml')), model, method,
      jax.random.key(0), (32,)).params
  for a, b in zip(jax.tree_util.tree_leaves(frozen['model']),
                  jax.tree_util.tree_leaves(initial['model'])):
    np.testing.assert_array_equal(a, b)
  assert float(frozen['scale_margin']['scale']) != float(initial['scale_margin']['scale'])


@pytest.mark.slow
def test_false_negatives_are_measured_per_epoch_without_changing_training(tfds_dir, tmp_path):
  """config.false_negative_images: paper Fig. 2's two numbers in every epoch's record, measured
  only (the run is bitwise the one without them), and the last epoch's equal to
  false_negatives.summary of the final state recomputed here."""
  from hml_jax.evaluation import false_negatives  # pylint: disable=g-import-not-at-top
  from hml_jax.state import sharding
  from hml_jax.training import input_pipeline
  plain, measured = tmp_path / 'plain', tmp_path / 'measured'
  train.train_and_evaluate(tiny_config(tfds_dir, num_epochs=2), str(plain))
  results = train.train_and_evaluate(tiny_config(tfds_dir, num_epochs=2, false_negative_images=64),
                                     str(measured))
  assert final_state(measured) == final_state(plain)
  for epoch in results['epochs']:
    assert 0 < epoch['false_negative_probability'] < 1
    assert 0 < epoch['false_negative_gradient_share'] < 1
  mesh = sharding.create_mesh()
  config, method, state = train_state.load_trained_state(str(measured), 'latest', mesh)
  data = input_pipeline.load(config)
  outputs, rows = steps.model_outputs(state,
                                      steps.StepSettings.from_config(config),
                                      data.train,
                                      mesh,
                                      64,
                                      max_images=64)
  scale, margin = (float(x) for x in train_state.scale_and_margin(
      state.params, train_state.StateSettings.from_config(config), method))
  expected = false_negatives.summary(method, outputs, data.train.labels[rows],
                                     data.train.observed[rows], scale, margin)
  for key, value in expected.items():
    assert results['epochs'][-1][key] == pytest.approx(value, rel=1e-5)


@pytest.mark.slow
def test_tensorboard_tags_are_grouped(tfds_dir, tmp_path):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  results = train.train_and_evaluate(
      tiny_config(tfds_dir, num_epochs=2, log_every_steps=1, false_negative_images=32),
      str(tmp_path))
  events = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={'tensors': 0})
  events.Reload()
  tags = set(events.Tags()['tensors']) | set(events.Tags()['scalars'])
  for tag in ('train/loss', 'train/bce', 'train/grad_norm', 'adaptive/scale', 'adaptive/margin',
              'adaptive/gradient_balance', 'adaptive/positive_gradient', 'val/map', 'test/map',
              'train/eta_seconds', 'train/loss_epoch', 'train/false_negative_gradient_share'):
    assert tag in tags, (tag, sorted(tags))
  assert not [tag for tag in tags if '/' not in tag and tag not in ('steps_per_sec', 'uptime')]

  def values(tag):
    return [float(tensor_util.make_ndarray(e.tensor_proto)) for e in events.Tensors(tag)
           ] if tag in events.Tags()['tensors'] else [e.value for e in events.Scalars(tag)]

  assert values('test/map') == pytest.approx([e['test_map'] for e in results['epochs']])
  eta = values('train/eta_seconds')
  assert eta[-1] == 0 and eta[0] > 0
