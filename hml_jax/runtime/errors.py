"""The errors that are the user's to fix, told apart from bugs.

A command-line tool prints a `UserError` as one line, `error: <message>`, and exits with status 2
(hml_jax/tools/cli.py); any other exception is a bug and keeps its traceback. The message names the
key, value, file or line at fault and says what to do.

`UserError` holds no state of its own, so it combines with the built-in type a caller would
catch: `InvalidInputError` is a ValueError, `MissingInputError` a FileNotFoundError.
"""


class UserError(Exception):
  """A mistake in what the user gave: a config key or value, a file, a dataset, a workdir."""


class InvalidInputError(UserError, ValueError):
  """A config value, a file's contents or a workdir that cannot be used as it is."""


class MissingInputError(UserError, FileNotFoundError):
  """A file or folder that the config or a flag names and that does not exist."""


class TrainingDivergedError(UserError, FloatingPointError):
  """The loss or a gradient became NaN or Inf (config.nonfinite='stop'): a setting to change."""
