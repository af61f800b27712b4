"""The jitted, sharded train step gives the same result on 1 and on 2 devices (same global batch)."""
import json
import os
import subprocess
import sys

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import json, jax, numpy as np
from hml_jax import losses, models, sharding, train
from configs import tiny
config = tiny.get_config()
config.learning_rate = 1e-2
method = losses.get_method(config.loss)
model = models.create_model(config.model, method.head, num_labels=10)
mesh = sharding.create_mesh()
state = train.create_train_state(config, model, method, jax.random.key(0), (32, 32, 1))
state = jax.device_put(state, sharding.replicated(mesh))
train_fn, eval_fn = train.make_step_functions(method, config, mesh)
rng = np.random.RandomState(0)
batch = {'images': rng.randint(0, 256, (16, 32, 32, 1)).astype(np.uint8),
         'labels': (rng.uniform(size=(16, 10)) < 0.3).astype(np.int32),
         'indices': np.arange(16, dtype=np.int32)}
losses_seen = []
for _ in range(3):
  state, metrics = train_fn(state, sharding.shard_batch(batch, mesh), {})
  losses_seen.append(float(metrics['bce']))
scores = eval_fn(state, sharding.shard_batch({'images': batch['images']}, mesh))
print(json.dumps({'devices': jax.device_count(), 'losses': losses_seen,
                  'scores': np.asarray(scores).tolist(),
                  'mean': float(np.asarray(state.batch_stats['backbone']['bn1']['mean']).sum())}))
"""


def run(num_devices):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={num_devices}',
             PYTHONPATH=ROOT)
  result = subprocess.run([sys.executable, '-c', SCRIPT], cwd=ROOT, env=env, check=True,
                          capture_output=True, text=True)
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_one_and_two_devices_agree():
  one, two = run(1), run(2)
  assert (one['devices'], two['devices']) == (1, 2)
  # Same global batch, so the same BatchNorm statistics and updates, up to reduction order.
  np.testing.assert_allclose(two['losses'], one['losses'], rtol=1e-4)
  np.testing.assert_allclose(two['mean'], one['mean'], rtol=1e-4)
  np.testing.assert_allclose(two['scores'], one['scores'], rtol=1e-3, atol=1e-3)
