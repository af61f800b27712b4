"""The paper's analysis figures for a trained run.

  python -m hml_jax.analyze --workdir=DIR [--max_images=5000] [--output=DIR/analysis]

Writes PNGs and analysis.json (the numbers behind them) into --output:
  label_correlation.png  Eq. 8 on the learned label embeddings, with the most correlated pairs
                         (paper Fig. 6); for the embedded dataset also the rank of each planted
                         partner pair among all pairs.
  cosine_densities.png   on training images: the density of the head's outputs (cosines, or
                         logits for a linear head) for observed positives, true negatives and
                         false negatives (positives the label scenario hid), and the gradient
                         magnitude |dL/d output| each group receives (paper Fig. 2).
  training.png           s* and m* per epoch (adaptive runs), and the accumulated positive and
                         negative gradient per epoch (paper Fig. 3), from results.json.
"""
import os
from typing import Dict, List, Optional, Sequence, Tuple

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TFDS imports TensorFlow
if __name__ == '__main__':
  # First thing, before JAX or TensorFlow allocate: restart with a fast malloc (allocator.py).
  from hml_jax.runtime import allocator  # pylint: disable=g-import-not-at-top
  allocator.restart_with_fast_allocator()

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import numpy as np

from hml_jax.evaluation import false_negatives
from hml_jax.models import heads
from hml_jax.runtime import files
from hml_jax.runtime import host
from hml_jax.state import sharding
from hml_jax.state import steps
from hml_jax.state import train_state
from hml_jax.tools import cli
from hml_jax.training import input_pipeline

FLAGS = flags.FLAGS
GROUPS = false_negatives.GROUPS
# Their owner is false_negatives.py; these names stay for code written against analyze.
entry_groups = false_negatives.entry_groups
gradient_magnitudes = false_negatives.gradient_magnitudes
GROUP_COLORS = {
    'positives': 'tab:green',
    'true negatives': 'tab:blue',
    'false negatives': 'tab:red'
}


def define_flags():
  """Defined only when this module runs as a program (no clash with other tools' flags)."""
  flags.DEFINE_string('workdir', None, 'A training workdir.')
  flags.DEFINE_string('output', None, 'Where the figures go (default: WORKDIR/analysis).')
  flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'], 'Which checkpoint.')
  flags.DEFINE_integer('max_images', 5000, 'Training images used for the densities.')
  flags.mark_flags_as_required(['workdir'])


# ------------------------------------------------------------------------------------------------
# Numbers (pure functions).


def label_embeddings(params, method) -> np.ndarray:
  """(num_labels, dim): the cosine head's label embeddings, or a linear head's weight columns."""
  return method.label_embeddings(params['model']['head'])


def ranked_pairs(correlation: np.ndarray) -> List[Tuple[int, int, float]]:
  """All pairs i < j, most correlated first (ties in index order)."""
  rows, columns = np.triu_indices(len(correlation), k=1)
  values = correlation[rows, columns]
  order = np.argsort(-values, kind='stable')
  return [(int(rows[k]), int(columns[k]), float(values[k])) for k in order]


def pair_ranks(correlation: np.ndarray, pairs: Sequence[Tuple[int, int]]) -> Dict[str, int]:
  """'i-j' -> rank (1 = most correlated) of each given pair among all pairs."""
  rank = {(i, j): position + 1 for position, (i, j, _) in enumerate(ranked_pairs(correlation))}
  return {f'{min(i, j)}-{max(i, j)}': rank[(min(i, j), max(i, j))] for i, j in pairs}


def pair_label(key: str, label_names: Sequence[str]) -> str:
  """'3-13' (pair_ranks' key) -> '3-δ': the pair by its labels' names."""
  i, j = (int(index) for index in key.split('-'))
  return f'{label_names[i]}-{label_names[j]}'


def planted_pairs(dataset_name: str) -> Sequence[Tuple[int, int]]:
  """The label pairs a generated dataset plants (ground truth of Eq. 8); () for other data."""
  if dataset_name == 'composite_digits':
    from hml_jax.datasets import composite_digits  # pylint: disable=g-import-not-at-top
    return composite_digits.PARTNER_PAIRS
  if dataset_name == 'glyph_digits':
    from hml_jax.datasets import glyphs  # pylint: disable=g-import-not-at-top
    return glyphs.PARTNER_PAIRS
  return ()


def densities(outputs, groups, gradients, bins=60):
  """Per group: histogram density of the outputs on shared bins, and the mean gradient
  magnitude; {'bin_edges', 'groups': {name: {'count', 'density', 'mean_output',
  'mean_gradient'}}}."""
  low, high = float(outputs.min()), float(outputs.max())
  padding = 0.02 * (high - low) or 0.5
  edges = np.linspace(low - padding, high + padding, bins + 1)
  summary = {'bin_edges': edges.tolist(), 'groups': {}}
  for name in GROUPS:
    mask = groups[name]
    values = outputs[mask]
    entry = {'count': int(mask.sum())}
    if len(values):
      entry.update(density=np.histogram(values, edges, density=True)[0].tolist(),
                   mean_output=float(values.mean()),
                   mean_gradient=float(gradients[mask].mean()),
                   total_gradient=float(gradients[mask].sum()))
    summary['groups'][name] = entry
  return summary


# ------------------------------------------------------------------------------------------------
# Figures.


def _title(workdir, config, what):
  run = '/'.join(os.path.normpath(workdir).split(os.sep)[-3:])  # e.g. hml/lr0.001_bs32/seed0
  return (f'{what}\n{run}: loss {config.loss}, {config.label_scenario} labels, '
          f'{config.dataset.name}')


def _save(figure, path):
  """PNG to a local path or a bucket."""
  import io  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png', dpi=110)
  files.write_bytes(path, buffer.getvalue())


def plot_correlation(path, correlation, label_names, top_pairs, title):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  size = max(6.0, 0.28 * len(label_names) + 3)
  figure, (heat, text) = plt.subplots(1,
                                      2,
                                      figsize=(size + 3.0, size),
                                      gridspec_kw={'width_ratios': [size, 3.0]})
  shown = np.where(np.eye(len(correlation), dtype=bool), np.nan, correlation)
  image = heat.imshow(shown, cmap='viridis', vmin=np.nanmin(shown), vmax=np.nanmax(shown))
  if len(label_names) <= 60:
    heat.set_xticks(range(len(label_names)), label_names, rotation=90, fontsize=8)
    heat.set_yticks(range(len(label_names)), label_names, fontsize=8)
  heat.set_xlabel('label j')
  heat.set_ylabel('label i')
  figure.colorbar(image, ax=heat, fraction=0.046, pad=0.04, label='Corr(i, j), Eq. 8')
  heat.set_title(title, fontsize=10)
  text.axis('off')
  lines = ['Most correlated pairs:'] + [f'{a} – {b}: {value:.3f}' for a, b, value in top_pairs]
  text.text(0.0, 1.0, '\n'.join(lines), va='top', family='monospace', fontsize=9)
  figure.tight_layout()
  _save(figure, path)
  plt.close(figure)


def plot_densities(path, summary, gradients_by_group, outputs_by_group, xlabel, title):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
  edges = np.asarray(summary['bin_edges'])
  centers = (edges[:-1] + edges[1:]) / 2
  for name in GROUPS:
    group = summary['groups'][name]
    if group['count'] == 0:
      continue
    left.plot(centers,
              group['density'],
              color=GROUP_COLORS[name],
              label=f"{name} (n={group['count']:,})")
    order = np.argsort(outputs_by_group[name])
    step = max(1, len(order) // 2000)  # keep the scatter light
    right.scatter(outputs_by_group[name][order][::step],
                  gradients_by_group[name][order][::step],
                  s=3,
                  alpha=0.4,
                  color=GROUP_COLORS[name],
                  label=f"{name}: mean {group['mean_gradient']:.3f}")
  left.set_xlabel(xlabel)
  left.set_ylabel('density')
  left.legend()
  left.set_title('Outputs on training images', fontsize=10)
  right.set_xlabel(xlabel)
  right.set_ylabel('|dL / d output|')
  right.legend(markerscale=4)
  right.set_title('Gradient magnitude each entry receives', fontsize=10)
  figure.suptitle(title, fontsize=10)
  figure.tight_layout()
  _save(figure, path)
  plt.close(figure)


def plot_training(path, epochs, title):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  numbers = [e['epoch'] for e in epochs]
  has_scale = all(e.get('scale') is not None for e in epochs)
  figure, axes = plt.subplots(1,
                              2 if has_scale else 1,
                              figsize=(12 if has_scale else 6, 4.5),
                              squeeze=False)
  gradient_axis = axes[0, -1]
  if all('positive_gradient' in e for e in epochs):
    gradient_axis.plot(numbers, [e['positive_gradient'] for e in epochs],
                       'o-',
                       color='tab:green',
                       label='positives: sum (1 - p)')
    gradient_axis.plot(numbers, [e['negative_gradient'] for e in epochs],
                       'o-',
                       color='tab:blue',
                       label='negatives (incl. unknown): sum p')
    gradient_axis.legend()
  else:
    gradient_axis.text(0.5, 0.5, 'not recorded by this run', ha='center')
  gradient_axis.set_xlabel('epoch')
  gradient_axis.set_ylabel('accumulated gradient per epoch')
  gradient_axis.set_title('Positive vs. negative gradient', fontsize=10)
  if has_scale:
    scale_axis = axes[0, 0]
    scale_axis.plot(numbers, [e['scale'] for e in epochs], 'o-', color='tab:purple')
    scale_axis.set_xlabel('epoch')
    scale_axis.set_ylabel('s*', color='tab:purple')
    scale_axis.ticklabel_format(axis='y', useOffset=False)
    margin_axis = scale_axis.twinx()
    margin_axis.plot(numbers, [e['margin'] for e in epochs], 's--', color='tab:orange')
    margin_axis.set_ylabel('m*', color='tab:orange')
    margin_axis.ticklabel_format(axis='y', useOffset=False)
    scale_axis.set_title('Scale and margin at the end of each epoch', fontsize=10)
  figure.suptitle(title, fontsize=10)
  figure.tight_layout()
  _save(figure, path)
  plt.close(figure)


# ------------------------------------------------------------------------------------------------
# The command.


def training_outputs(state, config, split, max_images, mesh):
  """Head outputs (cosines or logits), true and observed labels of up to max_images training
  images."""
  outputs, rows = steps.model_outputs(state,
                                      steps.StepSettings.from_config(config),
                                      split,
                                      mesh,
                                      config.eval_batch_size,
                                      max_images=max_images)
  return outputs, split.labels[rows], split.observed[rows]


def analyze(workdir: str,
            output: Optional[str] = None,
            which: str = 'best',
            max_images: int = 5000) -> Dict:
  output = output or files.join(workdir, 'analysis')
  files.makedirs(output)
  mesh = sharding.create_mesh()
  config, method, state = train_state.load_trained_state(workdir, which, mesh)
  scale, margin = (float(x) for x in train_state.scale_and_margin(
      state.params, train_state.StateSettings.from_config(config), method))
  data = input_pipeline.load(config)
  names = data.label_names
  report = {
      'workdir': workdir,
      'checkpoint': which,
      'loss': config.loss,
      'label_scenario': config.label_scenario,
      'scale': scale,
      'margin': margin,
      'label_names': names
  }

  # 1. Label correlation (Eq. 8). A linear head has no s, m of its own: its weight columns are
  # compared with the config's s, m so that the figure reads the same.
  embeddings = label_embeddings(state.params, method)
  correlation = np.asarray(heads.label_correlation(embeddings, scale, margin))
  pairs = ranked_pairs(correlation)
  top = [(names[i], names[j], value) for i, j, value in pairs[:10]]
  report['correlation'] = correlation.tolist()
  report['top_pairs'] = [{'labels': [a, b], 'correlation': value} for a, b, value in top]
  planted = planted_pairs(config.dataset.name)
  if planted:
    report['planted_pair_ranks'] = pair_ranks(correlation, planted)
    report['num_pairs'] = len(pairs)
  plot_correlation(
      files.join(output, 'label_correlation.png'), correlation, names, top,
      _title(workdir, config, f'Label correlation, Eq. 8 (s={scale:.2f}, '
             f'm={margin:.3f})'))

  # 2. Outputs and gradient magnitudes on training images (Fig. 2).
  outputs, true_labels, observed = training_outputs(state, config, data.train, max_images, mesh)
  groups = false_negatives.entry_groups(true_labels, observed)
  gradients = false_negatives.gradient_magnitudes(method, outputs, observed, scale, margin,
                                                  config.margin_on)
  report['densities'] = densities(outputs, groups, gradients)
  report['densities']['num_images'] = int(len(outputs))
  xlabel = 'cos(x, w_j)' if method.has_scale_and_margin else 'logit'
  plot_densities(files.join(output, 'cosine_densities.png'), report['densities'],
                 {n: gradients[groups[n]] for n in GROUPS}, {n: outputs[groups[n]] for n in GROUPS},
                 xlabel, _title(workdir, config, f'Training split, {len(outputs):,} images'))

  # 3. s*, m* and the accumulated gradients per epoch (Fig. 3).
  results_path = files.join(workdir, 'results.json')
  if files.exists(results_path):
    epochs = files.read_json(results_path)['epochs']
    report['epochs'] = [{
        key: e.get(key)
        for key in ('epoch', 'scale', 'margin', 'positive_gradient', 'negative_gradient')
    }
                        for e in epochs]
    plot_training(files.join(output, 'training.png'), epochs,
                  _title(workdir, config, 'Training dynamics'))
  files.write_json(files.join(output, 'analysis.json'), report)
  return report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  host.setup()
  report = analyze(FLAGS.workdir, FLAGS.output, FLAGS.checkpoint, FLAGS.max_images)
  print('Most correlated pairs: ' + ', '.join(
      f"{p['labels'][0]}-{p['labels'][1]} {p['correlation']:.3f}" for p in report['top_pairs']))
  if 'planted_pair_ranks' in report:
    print(f"Planted partner pairs, rank of {report['num_pairs']}: " +
          ', '.join(f'{pair_label(key, report["label_names"])} #{rank}'
                    for key, rank in report['planted_pair_ranks'].items()))
  for name, group in report['densities']['groups'].items():
    if group['count']:
      print(f"{name}: {group['count']:,} entries, mean output {group['mean_output']:.3f}, "
            f"mean |gradient| {group['mean_gradient']:.4f}")
  print(f"Figures and analysis.json in {FLAGS.output or files.join(FLAGS.workdir, 'analysis')}")


if __name__ == '__main__':
  define_flags()
  cli.run(main)
