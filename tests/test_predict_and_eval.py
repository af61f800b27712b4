"""Prediction and evaluation of a tiny trained checkpoint (composite digits)."""
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from hml_jax.state import sharding
from hml_jax.state import steps, train_state
from hml_jax.tools import evaluate
from hml_jax.tools import predict
from hml_jax.training import input_pipeline
from hml_jax.training import train
from tests.helpers import tiny_config

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI_ENV = {**os.environ, 'PYTHONPATH': PROJECT_ROOT, 'JAX_PLATFORMS': 'cpu'}


@pytest.fixture(scope='module')
def trained(tfds_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('run')
  config = tiny_config(tfds_dir)
  results = train.train_and_evaluate(config, str(workdir))
  return str(workdir), config, results


@pytest.mark.slow
def test_eval_mode_reproduces_the_reported_map(trained):
  workdir, _, results = trained
  evaluated = evaluate.evaluate_workdir(workdir, 'test')
  assert evaluated['map'] == pytest.approx(results['test_map'], abs=1e-3)
  assert evaluated['step'] == results['best_epoch'] * results['epochs'][0]['step']
  for key in ('CP', 'CR', 'CF1', 'OP', 'OR', 'OF1', 'precision@1', 'recall@3', 'precision@5'):
    assert 0.0 <= evaluated[key] <= 100.0
  assert list(evaluated['per_class_ap']) == list('0123456789')
  validation = evaluate.evaluate_workdir(workdir, 'validation')
  assert validation['map'] == pytest.approx(results['val_map'], abs=1e-3)
  with open(os.path.join(workdir, 'eval_test.json')) as f:
    assert json.load(f)['map'] == pytest.approx(evaluated['map'])
  assert '| label | AP |' in evaluate.format_results(evaluated)

  # Both commands: the trainer's eval mode and the evaluate tool print the same tables.
  outputs = [
      subprocess.run([sys.executable, '-m', *command, f'--workdir={workdir}', '--split=test'],
                     check=True,
                     capture_output=True,
                     text=True,
                     env=CLI_ENV,
                     cwd=PROJECT_ROOT).stdout
      for command in (['hml_jax.main', '--mode=eval'], ['hml_jax.evaluate'])
  ]
  assert f"mAP {results['test_map']:.2f}" in outputs[0] and outputs[0] == outputs[1]


@pytest.mark.slow
def test_predict_matches_evaluation_and_skips_unreadable_files(trained, tmp_path):
  workdir, config, _ = trained
  data = input_pipeline.load(config)
  batch = next(data.test.eval_batches(8))
  folder = tmp_path / 'images'
  (folder / 'sub').mkdir(parents=True)
  for i in range(4):
    Image.fromarray(batch['images'][i, ...,
                                    0]).save(folder / ('sub' if i % 2 else '.') / f'{i}.png')
  (folder / 'notes.txt').write_text('not an image')
  (folder / '.hidden.png').write_bytes(b'ignored')

  predictor = predict.Predictor(workdir)
  result = predict.predict_files(predictor,
                                 [str(folder), str(tmp_path / 'missing.jpg')],
                                 threshold=0.5,
                                 top_k=3)
  assert [os.path.basename(p['path']) for p in result['predictions']
         ] == ['0.png', '2.png', '1.png', '3.png']
  assert {os.path.basename(e['path']) for e in result['errors']} == {'notes.txt', 'missing.jpg'}
  # The same probabilities as the evaluation step on the same pixels.
  _, method, state = train_state.load_trained_state(workdir)
  mesh = sharding.create_mesh()
  _, eval_fn = steps.make_step_functions(method, steps.StepSettings.from_config(config), mesh)
  scores = steps.predict(eval_fn, state, data.test, config.eval_batch_size, mesh)[:4]
  expected = 1 / (1 + np.exp(-scores[[0, 2, 1, 3]].astype(np.float64)))
  for row, prediction in zip(expected, result['predictions']):
    top = [p['label'] for p in prediction['top_k']]
    assert top == [str(j) for j in np.argsort(-row, kind='stable')[:3]]
    np.testing.assert_allclose([p['probability'] for p in prediction['top_k']],
                               np.sort(row)[::-1][:3],
                               rtol=1e-5)
    assert [p['label'] for p in prediction['labels']
           ] == [str(j) for j in np.argsort(-row, kind='stable') if row[j] >= 0.5]

  completed = subprocess.run([
      sys.executable, '-m', 'hml_jax.predict', f'--workdir={workdir}', '--json', '--top_k=2',
      str(folder)
  ],
                             capture_output=True,
                             text=True,
                             env=CLI_ENV,
                             cwd=PROJECT_ROOT)
  assert completed.returncode == 0, completed.stderr
  document = json.loads(completed.stdout)
  assert len(document['predictions']) == 4 and len(document['predictions'][0]['top_k']) == 2
  assert 'notes.txt: skipped, not a readable image' in completed.stderr


@pytest.mark.slow
def test_analyze_writes_figures_and_the_numbers_behind_them(trained, tmp_path):
  from hml_jax.tools import analyze  # pylint: disable=g-import-not-at-top
  from hml_jax.models import heads
  workdir, _, results = trained
  report = analyze.analyze(workdir, str(tmp_path / 'figures'), max_images=100)
  for name in ('label_correlation.png', 'cosine_densities.png', 'training.png'):
    path = tmp_path / 'figures' / name
    assert path.stat().st_size > 10_000
    with Image.open(path) as image:
      assert image.size[0] > 500
  with open(tmp_path / 'figures' / 'analysis.json') as f:
    saved = json.load(f)
  config, method, state = train_state.load_trained_state(workdir)
  scale, margin = train_state.scale_and_margin(state.params,
                                               train_state.StateSettings.from_config(config),
                                               method)
  embeddings = np.asarray(state.params['model']['head']['label_embeddings']).T
  np.testing.assert_allclose(saved['correlation'],
                             heads.label_correlation(embeddings, scale, margin),
                             rtol=1e-6)
  assert sorted(saved['planted_pair_ranks'].values()) == sorted(
      analyze.pair_ranks(np.asarray(saved['correlation']), [(0, 6), (1, 7), (2, 5), (3, 8),
                                                            (4, 9)]).values())
  groups = saved['densities']['groups']
  assert saved['densities']['num_images'] == 100
  assert groups['positives']['count'] == 100  # one observed positive per image
  assert sum(g['count'] for g in groups.values()) == 100 * 10
  assert [e['scale'] for e in saved['epochs']] == [e['scale'] for e in results['epochs']]
  assert all(e['positive_gradient'] > 0 and e['negative_gradient'] > 0 for e in saved['epochs'])
  assert report['top_pairs'][0]['correlation'] >= report['top_pairs'][-1]['correlation']


def test_pairs_are_printed_by_their_labels_names():
  from hml_jax.tools import analyze  # pylint: disable=g-import-not-at-top
  assert analyze.pair_label('3-13', [str(d) for d in range(10)] + list('αβγδεζθλπω')) == '3-δ'


def test_evaluate_as_a_command_refuses_a_missing_workdir_in_one_line(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  result = subprocess.run(
      [sys.executable, '-m', 'hml_jax.evaluate', f'--workdir={tmp_path / "none"}'],
      capture_output=True,
      text=True,
      check=False)
  assert result.returncode == 2
  assert [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert 'Traceback' not in result.stderr


def test_gradient_magnitudes_match_the_analytic_derivative():
  from hml_jax.evaluation import false_negatives  # pylint: disable=g-import-not-at-top
  from hml_jax import methods
  rng = np.random.RandomState(0)
  cos = rng.uniform(-0.9, 0.9, size=(6, 4)).astype(np.float32)
  observed = (rng.uniform(size=(6, 4)) < 0.3).astype(np.float32)
  scale, margin = 20.0, 0.3
  got = false_negatives.gradient_magnitudes(methods.get_method('hml'), cos, observed, scale, margin)
  # d/dc of BCE(sigmoid(s cos(arccos c + m)), y) = s (p - y) (cos m + c sin m / sqrt(1 - c^2)).
  theta = np.arccos(cos.astype(np.float64))
  p = 1 / (1 + np.exp(-scale * np.cos(theta + margin)))
  expected = np.abs(
      scale * (p - observed) *
      (np.cos(margin) + cos * np.sin(margin) / np.sqrt(1 - cos.astype(np.float64)**2)))
  np.testing.assert_allclose(got, expected, rtol=1e-4)
  linear = false_negatives.gradient_magnitudes(methods.get_method('an'), cos, observed, scale,
                                               margin)
  np.testing.assert_allclose(linear, np.abs(1 / (1 + np.exp(-cos)) - observed), rtol=1e-5)
  # The per-epoch summary: the false negatives' mean probability and share of the gradient over
  # all unobserved entries, against the NumPy transcription above.
  true = np.maximum(observed, (rng.uniform(size=(6, 4)) < 0.4)).astype(np.float32)
  summary = false_negatives.summary(methods.get_method('hml'), cos, true, observed, scale, margin)
  false, negative = (true == 1) & (observed == 0), true == 0
  assert summary['false_negative_probability'] == pytest.approx(p[false].mean(), rel=1e-4)
  assert summary['false_negative_gradient_share'] == pytest.approx(
      expected[false].sum() / (expected[false].sum() + expected[negative].sum()), rel=1e-4)
  full = false_negatives.summary(methods.get_method('an'), cos, observed, observed, scale, margin)
  assert np.isnan(full['false_negative_gradient_share'])


@pytest.mark.slow
def test_eval_function_transposes_the_kernels_once_per_parameters(trained):
  """On CPU ('matmul' convolutions) the eval step takes the transposed kernels, computed once per
  parameters object: the same scores as transposing them in every call, and new parameters (as
  after a train step) get new matrices."""
  import jax  # pylint: disable=g-import-not-at-top
  workdir, config, _ = trained
  _, method, state = train_state.load_trained_state(workdir)
  mesh = sharding.create_mesh()
  _, eval_fn = steps.make_step_functions(method, steps.StepSettings.from_config(config), mesh)
  assert eval_fn.prepare is not None
  every_call = steps.EvalFunction(eval_fn.step)  # no prepare: the kernels transposed per call
  batch = sharding.shard_batch(next(input_pipeline.load(config).test.eval_batches(16)), mesh)
  # Up to float rounding: with the matrices given, stride-1 3x3 convolutions sum their taps in
  # another order (layers.shifted_products), and the scores (logits up to about 20) differ by
  # a few 1e-6.
  np.testing.assert_allclose(eval_fn(state, batch)['scores'],
                             every_call(state, batch)['scores'],
                             rtol=1e-6,
                             atol=1e-5)
  first = eval_fn.forward_matrices(state.params)
  assert eval_fn.forward_matrices(state.params) is first  # cached for the same parameters
  assert len(jax.tree_util.tree_leaves(first)) == sum(
      leaf.ndim == 4 for leaf in jax.tree_util.tree_leaves(state.params))
  changed = state.replace(params=jax.tree_util.tree_map(lambda leaf: leaf * 1.5, state.params))
  np.testing.assert_allclose(eval_fn(changed, batch)['scores'],
                             every_call(changed, batch)['scores'],
                             rtol=1e-6,
                             atol=1e-5)
  assert not np.allclose(eval_fn(changed, batch)['scores'], eval_fn(state, batch)['scores'])
  # A kernel replaced inside the same params dict counts as new parameters too.
  kernel_path, kernel = next((path, leaf)
                             for path, leaf in jax.tree_util.tree_leaves_with_path(changed.params)
                             if leaf.ndim == 4)
  container = changed.params
  for key in kernel_path[:-1]:
    container = container[key.key]
  container[kernel_path[-1].key] = -kernel
  np.testing.assert_allclose(eval_fn(changed, batch)['scores'],
                             every_call(changed, batch)['scores'],
                             rtol=1e-6,
                             atol=1e-5)
