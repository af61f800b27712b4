"""The false negatives of single positive training (paper Fig. 2): the entries whose label is
true but unobserved, which the losses take as negatives. Which entries they are, how hard the
loss pushes on each (|d BCE / d output|), and the two numbers that sum this up per epoch: their
mean predicted probability and their share of the negative side's gradient."""
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from hml_jax.methods import losses

GROUPS = ('positives', 'true negatives', 'false negatives')


def entry_groups(true_labels: np.ndarray, observed_labels: np.ndarray) -> Dict[str, np.ndarray]:
  """Boolean masks (num_images, num_labels): observed positives, true negatives, false negatives
  (true positives that training saw as unknown = negative)."""
  true_labels, observed = true_labels == 1, observed_labels == 1
  return {
      'positives': observed,
      'true negatives': ~true_labels,
      'false negatives': true_labels & ~observed
  }


def logits_and_gradients(method, outputs, observed_labels, scale, margin, margin_on='both'):
  """(logits, |d BCE / d output|) of each entry (num_images, num_labels), unknown labels as
  negatives: through the margin sigmoid of Eq. 4 for a cosine head, the logit for a linear
  one."""
  observed_labels = jnp.asarray(observed_labels, jnp.float32)
  margins = losses.entry_margins(observed_labels, margin, margin_on)

  def total_loss(outputs):
    logits = method.logits(outputs, scale, margins)
    return jnp.sum(observed_labels * jax.nn.softplus(-logits) +
                   (1.0 - observed_labels) * jax.nn.softplus(logits))

  outputs = jnp.asarray(outputs, jnp.float32)
  return (np.asarray(method.logits(outputs, scale,
                                   margins)), np.abs(np.asarray(jax.grad(total_loss)(outputs))))


def gradient_magnitudes(method, outputs, observed_labels, scale, margin, margin_on='both'):
  """|d BCE / d output| of each entry (logits_and_gradients)."""
  return logits_and_gradients(method, outputs, observed_labels, scale, margin, margin_on)[1]


def summary(method, outputs, true_labels, observed_labels, scale, margin, margin_on='both'):
  """{'false_negative_probability': their mean sigmoid(logit), 'false_negative_gradient_share':
  their part of the gradient magnitude summed over all unobserved entries (false + true
  negatives)}, NaN when there is no false negative (full labels)."""
  groups = entry_groups(true_labels, observed_labels)
  logits, gradients = logits_and_gradients(method, outputs, observed_labels, scale, margin,
                                           margin_on)
  false, true = groups['false negatives'], groups['true negatives']
  if not false.any():
    return {
        'false_negative_probability': float('nan'),
        'false_negative_gradient_share': float('nan')
    }
  false_mass, true_mass = gradients[false].sum(), gradients[true].sum()
  return {
      'false_negative_probability': float(np.mean(1.0 / (1.0 + np.exp(-logits[false])))),
      'false_negative_gradient_share': float(false_mass / max(false_mass + true_mass, 1e-30))
  }
