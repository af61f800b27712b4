"""Prediction and evaluation of a tiny trained checkpoint (composite digits)."""
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from hml_jax import evaluate
from hml_jax import input_pipeline
from hml_jax import predict
from hml_jax import sharding
from hml_jax import train
from tests.helpers import tiny_config

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI_ENV = {**os.environ, 'PYTHONPATH': PROJECT_ROOT, 'JAX_PLATFORMS': 'cpu'}


@pytest.fixture(scope='module')
def trained(tfds_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('run')
  config = tiny_config(tfds_dir)
  results = train.train_and_evaluate(config, str(workdir))
  return str(workdir), config, results


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

  output = subprocess.run(
      [sys.executable, '-m', 'hml_jax.main', '--mode=eval', f'--workdir={workdir}',
       '--split=test'], check=True, capture_output=True, text=True, env=CLI_ENV,
      cwd=PROJECT_ROOT).stdout
  assert f"mAP {results['test_map']:.2f}" in output


def test_predict_matches_evaluation_and_skips_unreadable_files(trained, tmp_path):
  workdir, config, _ = trained
  data = input_pipeline.load(config)
  batch = next(data.test.eval_batches(8))
  folder = tmp_path / 'images'
  (folder / 'sub').mkdir(parents=True)
  for i in range(4):
    Image.fromarray(batch['images'][i, ..., 0]).save(folder / ('sub' if i % 2 else '.') /
                                                     f'{i}.png')
  (folder / 'notes.txt').write_text('not an image')
  (folder / '.hidden.png').write_bytes(b'ignored')

  predictor = predict.Predictor(workdir)
  result = predict.predict_files(predictor, [str(folder), str(tmp_path / 'missing.jpg')],
                                 threshold=0.5, top_k=3)
  assert [os.path.basename(p['path']) for p in result['predictions']] == [
      '0.png', '2.png', '1.png', '3.png']
  assert {os.path.basename(e['path']) for e in result['errors']} == {'notes.txt', 'missing.jpg'}
  # The same probabilities as the evaluation step on the same pixels.
  _, method, state = train.load_trained_state(workdir)
  mesh = sharding.create_mesh()
  _, eval_fn = train.make_step_functions(method, config, mesh)
  scores = train.predict(eval_fn, state, data.test, config, mesh)[:4]
  expected = 1 / (1 + np.exp(-scores[[0, 2, 1, 3]].astype(np.float64)))
  for row, prediction in zip(expected, result['predictions']):
    top = [p['label'] for p in prediction['top_k']]
    assert top == [str(j) for j in np.argsort(-row, kind='stable')[:3]]
    np.testing.assert_allclose([p['probability'] for p in prediction['top_k']],
                               np.sort(row)[::-1][:3], rtol=1e-5)
    assert [p['label'] for p in prediction['labels']] == [
        str(j) for j in np.argsort(-row, kind='stable') if row[j] >= 0.5]

  completed = subprocess.run(
      [sys.executable, '-m', 'hml_jax.predict', f'--workdir={workdir}', '--json', '--top_k=2',
       str(folder)], capture_output=True, text=True, env=CLI_ENV, cwd=PROJECT_ROOT)
  assert completed.returncode == 0, completed.stderr
  document = json.loads(completed.stdout)
  assert len(document['predictions']) == 4 and len(document['predictions'][0]['top_k']) == 2
  assert 'notes.txt: skipped, not a readable image' in completed.stderr
