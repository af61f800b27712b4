"""What the hypersphere learned: label correlation (paper Sec. 3.5)."""
import jax
import jax.numpy as jnp

from hml_jax import heads


def label_correlation(embeddings, scale, margin) -> jax.Array:
  """Corr(i, j) = sigmoid(s cos(arccos(cos(w_i, w_j)) + m)), paper Eq. 8.

  embeddings: (num_labels, feature_dim), the paper's W (rows are label embeddings). Returns
  (num_labels, num_labels); higher means the two labels are closer on the sphere.
  """
  embeddings = jnp.asarray(embeddings, jnp.float32)
  cos = heads.cosine_similarity(embeddings, embeddings)
  return jax.nn.sigmoid(heads.margin_logits(cos, scale, margin))
