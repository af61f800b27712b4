"""Evaluate a trained checkpoint:

  python -m hml_jax.evaluate --workdir=DIR [--split=test] [--checkpoint=best] [--threshold=0.5]

(the same as `python -m hml_jax.main --mode=eval --workdir=DIR ...`).

mAP and per-class AP (the paper's metric), CP/CR/CF1 and OP/OR/OF1 at a probability threshold,
precision@k and recall@k. Written to DIR/eval_<split>.json and printed as tables.
"""
from typing import Dict, Sequence

if __name__ == '__main__':
  # First thing, before JAX or TensorFlow allocate: restart with a fast malloc (allocator.py).
  from hml_jax.runtime import allocator  # pylint: disable=g-import-not-at-top
  allocator.restart_with_fast_allocator()

from absl import flags  # pylint: disable=g-import-not-at-top
import jax
import numpy as np

from hml_jax.evaluation import metrics as metrics_lib
from hml_jax.runtime import errors
from hml_jax.runtime import files
from hml_jax.state import sharding
from hml_jax.state import steps
from hml_jax.state import train_state
from hml_jax.training import input_pipeline

SPLITS = ('train', 'validation', 'test')


def evaluate_workdir(workdir: str,
                     split: str = 'test',
                     which: str = 'best',
                     threshold: float = 0.5,
                     ks: Sequence[int] = (1, 3, 5)) -> Dict:
  """Every metric of one split, scored with the full (true) labels, for the best or latest
  checkpoint of workdir; also writes workdir/eval_<split>.json."""
  if split not in SPLITS:
    raise errors.InvalidInputError(f'Unknown split {split!r}; choose one of {list(SPLITS)}.')
  mesh = sharding.create_mesh()
  config, method, state = train_state.load_trained_state(workdir, which, mesh)
  data = input_pipeline.load(config)
  settings = steps.StepSettings.from_config(config)
  _, eval_fn = steps.make_step_functions(method,
                                         settings,
                                         mesh,
                                         state_shardings=train_state.train_state_shardings(
                                             settings.state, state, mesh))
  evaluated = getattr(data, split)
  scores = steps.predict(eval_fn, state, evaluated, config.eval_batch_size, mesh)
  labels = evaluated.labels
  probabilities = 1.0 / (1.0 + np.exp(-scores.astype(np.float64)))
  per_class = metrics_lib.average_precision_per_class(scores, labels)
  results = {
      'workdir': workdir,
      'checkpoint': which,
      'step': int(jax.device_get(state.step)),
      'split': split,
      'num_images': int(len(labels)),
      'map': float(np.nanmean(per_class)) * 100.0,
      'per_class_ap': {
          name: None if np.isnan(ap) else float(ap) * 100.0
          for name, ap in zip(data.label_names, per_class)
      },
      **{
          key: value * 100.0 if key != 'threshold' else value for key, value in metrics_lib.threshold_metrics(
              probabilities, labels, threshold).items()
      },
  }
  for k in ks:
    if k <= labels.shape[1]:
      results.update({
          key: value * 100.0 for key, value in metrics_lib.top_k_metrics(scores, labels, k).items()
      })
  files.write_json(files.join(workdir, f'eval_{split}.json'), results)
  return results


def format_results(results: Dict) -> str:
  """Markdown: the summary line, the threshold and top-k metrics, the per-class AP table."""
  lines = [
      f"{results['workdir']} ({results['checkpoint']} checkpoint, step {results['step']}), "
      f"{results['split']} split, {results['num_images']} images: "
      f"mAP {results['map']:.2f}", ''
  ]
  summary = ['CP', 'CR', 'CF1', 'OP', 'OR', 'OF1'] + sorted(key for key in results if '@' in key)
  lines += [
      '| ' + ' | '.join(summary) + ' |', '|' + '---|' * len(summary),
      '| ' + ' | '.join(f'{results[key]:.2f}' for key in summary) + ' |', '',
      f"(CP ... OF1 at probability >= {results['threshold']})", '', '| label | AP |', '|---|---|'
  ]
  lines += [
      f'| {name} | ' + ('—' if ap is None else f'{ap:.2f}') + ' |'
      for name, ap in results['per_class_ap'].items()
  ]
  return '\n'.join(lines)


def define_flags():
  """Defined only when this module runs as a program (no clash with other tools' flags)."""
  flags.DEFINE_string('workdir', None, 'A training workdir.')
  flags.DEFINE_enum('split', 'test', list(SPLITS), 'The split, scored with its full labels.')
  flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'], 'Which checkpoint.')
  flags.DEFINE_float('threshold', 0.5, 'Probability threshold of CP/CR/CF1/OP/OR/OF1.')
  flags.mark_flags_as_required(['workdir'])


def main(argv):
  from hml_jax.runtime import host  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise errors.InvalidInputError(f'Unexpected arguments {argv[1:]}; evaluate takes flags only.')
  host.setup()
  flag_values = flags.FLAGS
  print(
      format_results(
          evaluate_workdir(flag_values.workdir, flag_values.split, flag_values.checkpoint,
                           flag_values.threshold)))


if __name__ == '__main__':
  from hml_jax.tools import cli  # pylint: disable=g-import-not-at-top
  define_flags()
  cli.run(main)
