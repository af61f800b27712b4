"""What a run writes to TensorBoard, by group: train/ (the step's loss and its parts, the gradient
norm, skipped steps, per epoch the mean loss, the ETA and the false negatives of paper Fig. 2),
adaptive/ (s*, m*, the gradient-balance term of Eq. 6 and the accumulated positive and negative
pulls of Fig. 3), val/ and test/ (mAP per epoch). clu adds steps_per_sec and uptime."""
from typing import Dict, Mapping

# Step metrics of the adaptive half of HML (and the gradient pulls every method logs, Fig. 3).
ADAPTIVE_KEYS = ('scale', 'margin', 'gradient_balance', 'positive_gradient', 'negative_gradient')
# Diagnostics of the step that are not summaries of it (the index of a non-finite gradient).
NOT_WRITTEN = ('first_nonfinite_gradient',)


def step_scalars(metrics: Mapping[str, float]) -> Dict[str, float]:
  """{'loss': ..., 'scale': ...} of one train step -> {'train/loss': ..., 'adaptive/scale': ...}."""
  return {
      f"{'adaptive' if key in ADAPTIVE_KEYS else 'train'}/{key}": value
      for key, value in metrics.items()
      if key not in NOT_WRITTEN
  }


def epoch_scalars(record: Mapping, eta_seconds: float) -> Dict[str, float]:
  """An epoch's record (results.json's) -> val/map, test/map, train/loss_epoch, train/epoch,
  train/eta_seconds and, when measured, train/false_negative_*."""
  scalars = {
      'val/map': record['val_map'],
      'test/map': record['test_map'],
      'train/loss_epoch': record['train_loss'],
      'train/epoch': record['epoch'],
      'train/eta_seconds': eta_seconds,
  }
  scalars.update({
      f'train/{key}': value for key, value in record.items() if key.startswith('false_negative')
  })
  return scalars
