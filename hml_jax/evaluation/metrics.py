"""Ranking metrics for multi-label classification, in NumPy (run on host after evaluation).

Shapes: scores and labels (num_examples, num_labels); higher score = more likely positive.
"""
import numpy as np


def average_precision_per_class(scores, labels) -> np.ndarray:
  """Average precision of each class (column), equal to sklearn's average_precision_score.

  AP = sum_k (R_k - R_{k-1}) P_k over the distinct score thresholds, so tied scores form one
  threshold: every positive in a tie group gets the precision at the end of its group. Vectorized
  over classes (one sort of the whole matrix, no loop over examples or classes).

  A class with no positive example has no defined AP: it gets NaN here (sklearn warns and returns
  0), and mean_average_precision leaves it out of the mean.
  """
  scores = np.asarray(scores, dtype=np.float64)
  labels = np.asarray(labels)
  if scores.shape != labels.shape or scores.ndim != 2:
    raise ValueError(f'scores {scores.shape} and labels {labels.shape} must both be '
                     '(num_examples, num_labels).')
  if not np.isin(labels, (0, 1)).all():
    raise ValueError(f'labels must be 0/1, got values {np.unique(labels)[:10]}.')
  num_examples = scores.shape[0]
  order = np.argsort(-scores, axis=0, kind='stable')
  sorted_scores = np.take_along_axis(scores, order, axis=0)
  sorted_labels = np.take_along_axis(labels.astype(np.float64), order, axis=0)
  true_positives = np.cumsum(sorted_labels, axis=0)
  precision = true_positives / np.arange(1, num_examples + 1)[:, None]
  # Index of the last row of each row's tie group: the threshold at which that row is counted.
  group_ends = np.ones(scores.shape, dtype=bool)
  group_ends[:-1] = sorted_scores[:-1] != sorted_scores[1:]
  candidates = np.where(group_ends, np.arange(num_examples)[:, None], num_examples)
  end_of_group = np.minimum.accumulate(candidates[::-1], axis=0)[::-1]
  precision_at_threshold = np.take_along_axis(precision, end_of_group, axis=0)
  num_positives = sorted_labels.sum(axis=0)
  with np.errstate(invalid='ignore', divide='ignore'):
    ap = (sorted_labels * precision_at_threshold).sum(axis=0) / num_positives
  return np.where(num_positives > 0, ap, np.nan)


def mean_average_precision(scores, labels) -> float:
  """mAP in [0, 1]: mean over classes that have at least one positive of their AP."""
  ap = average_precision_per_class(scores, labels)
  if np.all(np.isnan(ap)):
    raise ValueError('mAP is undefined: no class has a positive example.')
  return float(np.nanmean(ap))


def threshold_metrics(probabilities, labels, threshold: float = 0.5) -> dict:
  """Per-class (C) and overall (O) precision, recall and F1 of predictions p >= threshold, as
  multi-label papers report them (e.g. ML-GCN, Chen et al. CVPR 2019).

  CP, CR: means over classes of each class's precision and recall; CF1 = 2 CP CR / (CP + CR).
  OP, OR: precision and recall of all (image, label) decisions pooled; OF1 likewise.
  A class that is never predicted has precision 0, one with no positive has recall 0 (sklearn's
  zero_division=0). All values in [0, 1].
  """
  probabilities = np.asarray(probabilities, np.float64)
  labels = np.asarray(labels)
  if probabilities.shape != labels.shape or probabilities.ndim != 2:
    raise ValueError(f'probabilities {probabilities.shape} and labels {labels.shape} must both '
                     'be (num_examples, num_labels).')
  predicted = probabilities >= threshold
  positive = labels == 1
  true_positives = np.sum(predicted & positive, axis=0).astype(np.float64)
  num_predicted = np.sum(predicted, axis=0)
  num_positive = np.sum(positive, axis=0)
  per_class_precision = np.divide(true_positives,
                                  num_predicted,
                                  out=np.zeros_like(true_positives),
                                  where=num_predicted > 0)
  per_class_recall = np.divide(true_positives,
                               num_positive,
                               out=np.zeros_like(true_positives),
                               where=num_positive > 0)

  def f1(precision, recall):
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)

  cp, cr = float(per_class_precision.mean()), float(per_class_recall.mean())
  op = float(true_positives.sum() / max(num_predicted.sum(), 1))
  o_r = float(true_positives.sum() / max(num_positive.sum(), 1))
  return {
      'CP': cp,
      'CR': cr,
      'CF1': f1(cp, cr),
      'OP': op,
      'OR': o_r,
      'OF1': f1(op, o_r),
      'threshold': float(threshold)
  }


def top_k_metrics(scores, labels, k: int) -> dict:
  """precision@k: mean over images of (true labels among the k highest scores) / k;
  recall@k: mean over images with at least one positive of that count / their positives."""
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels)
  if not 1 <= k <= scores.shape[1]:
    raise ValueError(f'k={k} must be between 1 and the number of labels, {scores.shape[1]}.')
  top = np.argsort(-scores, axis=1, kind='stable')[:, :k]
  hits = np.take_along_axis(labels == 1, top, axis=1).sum(axis=1)
  num_positive = labels.sum(axis=1)
  has_positive = num_positive > 0
  return {
      f'precision@{k}':
          float(np.mean(hits / k)),
      f'recall@{k}':
          float(np.mean(hits[has_positive] /
                        num_positive[has_positive])) if has_positive.any() else float('nan')
  }
