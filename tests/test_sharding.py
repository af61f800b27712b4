"""The jitted, sharded train step gives the same result on 1 and on 2 devices (same global batch)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import json, sys, jax, numpy as np
from hml_jax import methods, models
from hml_jax.configs import tiny
from hml_jax.methods import losses
from hml_jax.state import sharding, steps, train_state
from hml_jax.training import loss_arguments, train
results = {}
for loss in sys.argv[1].split(','):
  config = tiny.get_config()
  config.learning_rate = 1e-2
  config.loss = loss
  config.delta_rel = 50.0  # LL-Cp: ceil(160 * 0.5) = 80 corrections per step
  method = methods.get_method(config.loss)
  model = models.create_model(config.model, method.head, num_labels=10)
  mesh = sharding.create_mesh()
  rng = np.random.RandomState(0)
  observed = (rng.uniform(size=(40, 10)) < 0.3).astype(np.int32)
  state = train_state.create_train_state(train_state.StateSettings.from_config(config), model, method, jax.random.key(0), (32, 32, 1),
                                   observed_labels=observed)
  state = jax.device_put(state, sharding.replicated(mesh))
  hyperparameters = loss_arguments.loss_hyperparameters(method, config, observed)
  train_fn, eval_fn = steps.make_step_functions(method, steps.StepSettings.from_config(config), mesh, hyperparameters)
  indices = np.sort(rng.permutation(40)[:16]).astype(np.int32)
  batch = {'images': rng.randint(0, 256, (16, 32, 32, 1)).astype(np.uint8),
           'labels': observed[indices], 'indices': indices}
  schedule = loss_arguments.epoch_schedule(method, config, 2, 160)
  losses_seen = []
  for _ in range(3):
    state, metrics = train_fn(state, sharding.shard_batch(batch, mesh),
                              {k: np.asarray(v) for k, v in schedule.items()})
    losses_seen.append(float(metrics['loss']))
  scores = eval_fn(state, sharding.shard_batch(
      {'images': batch['images'], 'indices': np.arange(16, dtype=np.int32),
       'mask': np.ones(16, bool)}, mesh))['scores']
  label_state = state.observed_labels
  results[loss] = {
      'devices': jax.device_count(), 'losses': losses_seen,
      'initial_positives': int(observed.sum()),
      'scores': np.asarray(scores).tolist(),
      'labels': None if label_state is None else np.asarray(label_state).tolist(),
      'estimator': (np.asarray(state.params['estimator']).tolist()
                    if 'estimator' in state.params else None),
      'mean': float(np.asarray(state.batch_stats['backbone']['bn1']['mean']).sum())}
print(json.dumps(results))
"""

LOSSES = ('hml', 'll_cp', 'role')


def run(num_devices):
  """Every loss of LOSSES in one process of num_devices devices (one import and start-up)."""
  env = dict(
      os.environ,
      # conftest's XLA flags (the optimization level) and the device count.
      XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
      f'--xla_force_host_platform_device_count={num_devices}',
      PYTHONPATH=ROOT)
  result = subprocess.run([sys.executable, '-c', SCRIPT, ','.join(LOSSES)],
                          cwd=ROOT,
                          env=env,
                          check=True,
                          capture_output=True,
                          text=True)
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_one_and_two_devices_agree():
  """HML, and LL-Cp's label state (gathered and scattered by row) and ROLE's estimator."""
  runs_on_one, runs_on_two = run(1), run(2)
  for loss in LOSSES:
    one, two = runs_on_one[loss], runs_on_two[loss]
    assert (one['devices'], two['devices']) == (1, 2)
    # Same global batch, so the same BatchNorm statistics and updates, up to reduction order.
    np.testing.assert_allclose(two['losses'], one['losses'], rtol=1e-4, err_msg=loss)
    np.testing.assert_allclose(two['mean'], one['mean'], rtol=1e-4, err_msg=loss)
    np.testing.assert_allclose(two['scores'], one['scores'], rtol=1e-3, atol=1e-3, err_msg=loss)
    if loss == 'll_cp':
      assert np.sum(one['labels']) > one['initial_positives']  # corrections were made
      np.testing.assert_array_equal(two['labels'], one['labels'])
    if loss == 'role':
      np.testing.assert_allclose(two['estimator'], one['estimator'], rtol=1e-4, atol=1e-6)
