"""Evaluate a trained checkpoint: `python -m hml_jax.main --mode=eval --workdir=DIR --split=test`.

mAP and per-class AP (the paper's metric), CP/CR/CF1 and OP/OR/OF1 at a probability threshold,
precision@k and recall@k. Written to DIR/eval_<split>.json and printed as tables.
"""
from typing import Dict, Sequence

import jax
import numpy as np

from hml_jax import errors
from hml_jax import files
from hml_jax import input_pipeline
from hml_jax import metrics as metrics_lib
from hml_jax import sharding
from hml_jax import train_state
from hml_jax import steps

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
  _, eval_fn = steps.make_step_functions(method,
                                         config,
                                         mesh,
                                         state_shardings=train_state.train_state_shardings(
                                             config, state, mesh))
  evaluated = getattr(data, split)
  scores = steps.predict(eval_fn, state, evaluated, config, mesh)
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


if __name__ == '__main__':
  # A library module; evaluation from the command line is the trainer's mode (one entry point).
  import sys  # pylint: disable=g-import-not-at-top
  sys.exit('hml_jax.evaluate is a library module. Evaluate a run with: python -m hml_jax.main '
           '--mode=eval --workdir=DIR [--split=test]')
