"""config.parameter_sharding='fsdp': which arrays are split, and that it changes nothing but the
layout (same losses, parameters and checkpoints as 'replicated', on 8 virtual CPU devices)."""
import json
import os
import subprocess
import sys

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from hml_jax import methods, models
from hml_jax.configs import tiny
from hml_jax.state import sharding, train_state, workdir_files
from hml_jax.training import train
from tests.test_multihost import command, environment, results, TINY_MIN_SIZE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    'shape, expected',
    [
        ((2048, 5000), P(None, 'data')),  # a 5,000-label head: split along the labels
        ((2048, 81), P('data', None)),  # NUS-WIDE's head: 81 is not divisible by 8
        ((3, 3, 512, 512), P(None, None, None, 'data')),  # a tie: the later (output) dimension
        ((1, 1, 1024, 2048), P(None, None, None, 'data')),
        ((2048, 20), P()),  # VOC's head: 40,960 elements, below 2**16
        ((81, 1025), P()),  # large, but 8 divides none of its dimensions
        ((1000, 1024, 9), P(None, 'data', None)),  # the largest divisible one, not the largest
        ((2048,), P()),  # BatchNorm vectors and scalars
        ((), P()),
    ])
def test_fsdp_spec_splits_the_largest_dimension_the_devices_divide(shape, expected):
  assert sharding.fsdp_spec(shape, 8, min_size=2**16) == expected


def test_fsdp_spec_on_one_device_and_at_the_threshold():
  assert sharding.fsdp_spec((2048, 5000), 1, min_size=2**16) == P()  # nothing to split over
  assert sharding.fsdp_spec((256, 256), 8, min_size=2**16) == P(None, 'data')  # exactly 2**16
  assert sharding.fsdp_spec((256, 255), 8, min_size=2**16) == P()


def tiny_state_shapes(loss, num_train=40):
  """jax.eval_shape of the tiny config's train state (10 labels). 'hml': a cosine head and s*,
  m*; 'll_cp': a linear head and a label state (num_train, 10)."""
  config = tiny.get_config()
  config.loss = loss
  method = methods.get_method(loss)
  model = models.create_model(config.model, method.head, num_labels=10)
  return train_state.train_state_shapes(train_state.StateSettings.from_config(config),
                                        model,
                                        method, (32, 32, 1),
                                        observed_labels=np.zeros((num_train, 10), np.int32))


def specs_by_name(shardings):
  return {
      jax.tree_util.keystr(path): target.spec
      for path, target in jax.tree_util.tree_leaves_with_path(shardings)
  }


def test_state_shardings_of_the_tiny_state():
  """On an abstract 8-device mesh: the state need not exist, nor the devices."""
  mesh = jax.sharding.AbstractMesh((8,), (sharding.DATA_AXIS,),
                                   axis_types=(jax.sharding.AxisType.Auto,))
  shapes = tiny_state_shapes('hml')
  fsdp = specs_by_name(sharding.state_shardings(shapes, mesh, 'fsdp', TINY_MIN_SIZE))
  head = "['model']['head']['label_embeddings']"
  assert fsdp[f'.params{head}'] == P('data', None)  # (16 features, 10 labels): 10 % 8 != 0
  for moment in ('mu', 'nu'):  # Adam's moments are laid out as their parameters
    assert fsdp[f".opt_state.inner_states['model'].inner_state[0].{moment}{head}"] == P(
        'data', None)
  assert fsdp[".params['model']['backbone']['layer2_0']['conv2']['kernel']"] == P(
      None, None, None, 'data')  # (3, 3, 16, 16)
  assert fsdp[".params['model']['backbone']['conv1']['kernel']"] == P()  # 72 < 128 elements
  assert fsdp['.step'] == P()
  assert fsdp[".batch_stats['backbone']['bn1']['mean']"] == P()
  assert fsdp[".params['scale_margin']['scale']"] == P()
  split = [name for name, spec in fsdp.items() if spec != P()]
  assert len(split) == 3 * 6  # 6 parameters at or above the threshold and their 2 moments each

  def label_state_spec(num_train):
    shapes = tiny_state_shapes('ll_cp', num_train)
    return specs_by_name(sharding.state_shardings(shapes, mesh, 'fsdp',
                                                  TINY_MIN_SIZE))['.observed_labels']

  assert label_state_spec(40) == P('data', None)  # (40 images, 10 labels)
  assert label_state_spec(44) == P()  # 8 divides neither 44 nor 10
  replicated = specs_by_name(sharding.state_shardings(shapes, mesh, 'replicated', TINY_MIN_SIZE))
  assert set(replicated.values()) == {P()} and replicated.keys() == fsdp.keys()


def test_unknown_parameter_sharding_is_refused_naming_the_key():
  config = tiny.get_config()
  config.parameter_sharding = 'zero3'
  with pytest.raises(ValueError, match=r"config.parameter_sharding='zero3'.*'replicated', 'fsdp'"):
    train.validate_config(config)
  config.parameter_sharding = 'fsdp'
  config.fsdp_min_size = -1
  with pytest.raises(ValueError, match='config.fsdp_min_size'):
    train.validate_config(config)


def test_the_layout_is_resumable_and_older_workdirs_are_refused(tmp_path):
  """parameter_sharding may change on resume; a config.json of an older workdir format (without
  the version key) is refused, naming what to do, and left as it was."""
  config = tiny.get_config()
  workdir_files.write_config(str(tmp_path), config)
  for mode in ('replicated', 'fsdp'):
    config.parameter_sharding = mode
    workdir_files.check_config(str(tmp_path), config)
  older = config.to_dict()
  del older['parameter_sharding'], older['fsdp_min_size']
  (tmp_path / 'config.json').write_text(json.dumps(older))
  with pytest.raises(ValueError,
                     match=r'made by an older version of hml_jax \(workdir format 1;'
                     r' this version reads format 2.*another --workdir; nothing was changed'):
    workdir_files.check_config(str(tmp_path), config)
  assert (tmp_path / 'config.json').read_text() == json.dumps(older)


def run_on_8_devices(script, *arguments):
  """Runs a script in a fresh Python with 8 virtual CPU devices; its last line, as JSON."""
  result = subprocess.run([sys.executable, '-c', script, *arguments],
                          cwd=ROOT,
                          env=environment(8),
                          capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


# The same 3 train steps and an eval step, from the same initial values, in both layouts.
STEPS = """
import json, sys, jax, numpy as np
from hml_jax import methods, models
from hml_jax.configs import tiny
from hml_jax.methods import losses
from hml_jax.state import sharding, steps, train_state
from hml_jax.training import loss_arguments
config = tiny.get_config()
config.learning_rate = 1e-2
config.loss = sys.argv[1]
config.fsdp_min_size = int(sys.argv[2])
method = methods.get_method(config.loss)
model = models.create_model(config.model, method.head, num_labels=10)
mesh = sharding.create_mesh()
rng = np.random.RandomState(0)
observed = (rng.uniform(size=(40, 10)) < 0.3).astype(np.int32)
initial = jax.device_get(train_state.create_train_state(train_state.StateSettings.from_config(config), model, method, jax.random.key(0),
                                                  (32, 32, 1), observed_labels=observed))
indices = np.sort(rng.permutation(40)[:16]).astype(np.int32)
batch = {'images': rng.randint(0, 256, (16, 32, 32, 1)).astype(np.uint8),
         'labels': observed[indices], 'indices': indices}
eval_batch = {'images': batch['images'], 'indices': np.arange(16, dtype=np.int32),
              'mask': np.ones(16, bool)}
schedule = {k: np.asarray(v) for k, v in
            loss_arguments.epoch_schedule(method, config, 2, 160).items()}
runs = {}
# 'perturbed': replicated, from parameters scaled by 1 + 1e-7 (about one float32 rounding), to
# measure how far rounding alone moves these 3 steps.
for mode in ('replicated', 'fsdp', 'perturbed'):
  config.parameter_sharding = 'fsdp' if mode == 'fsdp' else 'replicated'
  start = initial if mode != 'perturbed' else initial.replace(params=jax.tree.map(
      lambda x: x * (1 + 1e-7) if x.dtype == np.float32 else x, initial.params))
  shardings = train_state.train_state_shardings(train_state.StateSettings.from_config(config), start, mesh)
  state = sharding.place(start, shardings)
  train_fn, eval_fn = steps.make_step_functions(
      method, steps.StepSettings.from_config(config), mesh,
      loss_arguments.loss_hyperparameters(method, config, observed), shardings)
  step_losses = []
  for _ in range(3):
    state, metrics = train_fn(state, sharding.shard_batch(batch, mesh), schedule)
    step_losses.append(float(metrics['loss']))
  scores = eval_fn(state, sharding.shard_batch(eval_batch, mesh))['scores']
  head = state.params['model']['head']  # a cosine head's embeddings, or a linear head's kernel
  head = head['label_embeddings'] if 'label_embeddings' in head else head['classifier']['kernel']
  runs[mode] = {
      'losses': step_losses, 'scores': np.asarray(scores).tolist(),
      'scores_spec': list(scores.sharding.spec),
      'embeddings_spec': list(head.sharding.spec),
      'labels_spec': (None if state.observed_labels is None
                      else list(state.observed_labels.sharding.spec)),
      'leaves': [np.asarray(x, np.float64).ravel().tolist()
                 for x in jax.tree_util.tree_leaves(jax.device_get(state))]}
print(json.dumps(runs))
"""


@pytest.mark.slow
# HML only: the label state's fsdp layout is checked in test_state_shardings_of_the_tiny_state,
# and LL-Cp's gather and scatter of it across devices in test_sharding.py.
@pytest.mark.parametrize('loss', ['hml'])
def test_fsdp_trains_as_replicated(loss):
  """HML (cosine head, s*, m*) and LL-Cp (its label state is gathered by the batch's rows and
  scattered back): 3 steps at learning rate 1e-2, then scores."""
  runs = run_on_8_devices(STEPS, loss, str(TINY_MIN_SIZE))
  replicated, fsdp = runs['replicated'], runs['fsdp']
  assert replicated['embeddings_spec'] == []
  assert fsdp['embeddings_spec'] == ['data', None]  # still split after steps
  assert fsdp['scores_spec'] == []  # outputs stay replicated
  if loss == 'll_cp':
    assert fsdp['labels_spec'] == ['data', None]
  # Only the order of floating-point reductions differs (a reduce-scatter of the gradients
  # instead of an all-reduce), so fsdp may differ from replicated as much as rounding moves the
  # run, no more. Three steps at learning rate 1e-2 amplify rounding: Adam divides tiny
  # gradients by their own size and the adaptive margin's gradient is a balance near zero. Seen
  # on this CPU for HML: parameters scaled by 1 + 1e-7 move the scores by 1.4e-3 after 3 steps,
  # and fsdp differs from replicated by the same 1.4e-3; losses within 1e-6 relative.
  perturbed = runs['perturbed']

  def largest_difference(a, b):
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y)), initial=0.0)) for x, y in zip(a, b))

  np.testing.assert_allclose(fsdp['losses'], replicated['losses'], rtol=1e-5)
  assert len(fsdp['leaves']) == len(replicated['leaves'])
  for key in ('scores', 'leaves'):  # leaves: parameters, Adam's moments, label state
    rounding = largest_difference(perturbed[key], replicated[key])
    # 10x: the suite compiles at XLA's optimization level 0 (tests/conftest.py), which rounds in
    # other places than the perturbation does (seen: 6.1e-5 against a yardstick of 1.2e-5).
    assert largest_difference(fsdp[key], replicated[key]) <= 10 * rounding + 1e-5, key


@pytest.fixture(scope='module')
def replicated_run(tfds_dir, tmp_path_factory):
  """The workdir of 2 epochs of the tiny config on 8 devices, replicated (the CLI)."""
  workdir = tmp_path_factory.mktemp('replicated_run')
  subprocess.run(command(workdir, tfds_dir, '--config.num_epochs=2'),
                 cwd=ROOT,
                 env=environment(8),
                 check=True,
                 capture_output=True)
  return workdir


# Resuming across layouts through the real training loop: epoch 1 in fsdp, epoch 2 replicated,
# compared with the replicated run; then the checkpoints of both epochs (written in fsdp and
# replicated) restored into each layout.
RESUME = """
import json, sys, jax, numpy as np
from hml_jax.state import checkpoints, sharding, train_state, workdir_files
from hml_jax.training import train
from tests.helpers import tiny_config
data_dir, workdir, reference, min_size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def config(epochs, mode):
  return tiny_config(data_dir, num_epochs=epochs, parameter_sharding=mode, fsdp_min_size=min_size)
train.train_and_evaluate(config(1, 'fsdp'), workdir)
resumed = train.train_and_evaluate(config(2, 'replicated'), workdir)
mesh = sharding.create_mesh()
_, _, final = train_state.load_trained_state(workdir, 'latest', mesh)
_, _, expected = train_state.load_trained_state(reference, 'latest', mesh)
# checkpoints/1 was written in fsdp, checkpoints/2 replicated: restore each into both layouts.
restored = {}
shapes = jax.eval_shape(lambda: final)
manager = checkpoints.Checkpointer(workdir, keep=2)
for mode in ('replicated', 'fsdp'):
  target = sharding.abstract_arrays(
      shapes, train_state.train_state_shardings(train_state.StateSettings.from_config(config(2, mode)), shapes, mesh))
  for step in (1, 2):
    state, _ = manager._restore(manager.latest, step, target)
    restored[f'{step} into {mode}'] = {
        'spec': list(state.params['model']['head']['label_embeddings'].sharding.spec),
        'leaves': [np.asarray(x).tobytes().hex() for x in jax.tree_util.tree_leaves(state)]}
print(json.dumps({
    'resumed': [e['train_loss'] for e in resumed['epochs']],
    'final_spec': list(final.params['model']['head']['label_embeddings'].sharding.spec),
    'max_parameter_difference': max(
        float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b))))
        for a, b in zip(jax.tree_util.tree_leaves(final.params),
                        jax.tree_util.tree_leaves(expected.params))),
    'restored': restored}))
"""


@pytest.mark.slow
def test_resume_in_the_other_layout(tfds_dir, tmp_path, replicated_run):
  result = run_on_8_devices(RESUME, str(tfds_dir), str(tmp_path / 'switched'), str(replicated_run),
                            str(TINY_MIN_SIZE))
  # 24 steps, 12 of which reduce in another order (fsdp): per-epoch losses as
  # tests/test_multihost.py allows between device counts, parameters (of magnitude up to 0.6)
  # within 1e-3. Seen on this CPU: 6e-5 relative and 1.5e-4.
  np.testing.assert_allclose(result['resumed'],
                             [e['train_loss'] for e in results(replicated_run)['epochs']],
                             rtol=2e-4)
  assert result['max_parameter_difference'] < 1e-3
  # The workdir's config.json says fsdp (its first run): load_trained_state lays it out so.
  assert result['final_spec'] == ['data', None]
  restored = result['restored']
  for step in (1, 2):
    assert restored[f'{step} into replicated']['spec'] == []
    assert restored[f'{step} into fsdp']['spec'] == ['data', None]
    # The same values whatever layout they were written in and are read into.
    assert restored[f'{step} into replicated']['leaves'] == restored[f'{step} into fsdp']['leaves']


# Two processes in fsdp (arrays split across processes, each saving its shards): the two-process
# run of tests/test_multihost.py.
