"""Training a method as its recipe says: train_and_evaluate(config, workdir) runs the phases a
recipe composes (hml_jax/methods/recipes.py: Cole et al.'s linear init, the head alone on the frozen
backbone's features first, linear_init.py), then the run itself (loop.py, which knows no phase).
The command-line trainer (main.py), compare.py and notebooks call this."""
from typing import Any, Dict, Optional

import ml_collections

from hml_jax.training import config_checks
from hml_jax.training import input_pipeline
from hml_jax.training import linear_init
from hml_jax.training import loop

# The single run's checks, for callers that validate a config before training it.
validate_config = config_checks.validate_config


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str,
                       data: Optional[input_pipeline.Data] = None) -> Dict[str, Any]:
  """Trains config.loss on config.dataset by its recipe, evaluates every epoch, writes
  workdir/results.json. Running the same command again resumes from the newest checkpoint."""
  return loop.train_and_evaluate(config, workdir, data, head_phase=linear_init.train_head)
