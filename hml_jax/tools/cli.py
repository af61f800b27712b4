"""How every command-line tool starts and how it ends on a user's mistake.

`run(main)` is absl's `app.run(main)` with one difference: a mistake of the user's (an unknown
or malformed flag, a config file that does not load, a mistyped `--config.KEY`, and any
`errors.UserError` raised while the tool works) ends as one line on stderr,

  error: <what is wrong, naming the key, value, file or line, and what to do>

and exit status 2, without a traceback. Everything else is a bug and keeps its traceback;
`--verbosity=1` shows the traceback of a user error too.
"""
import os
import re
import sys
from typing import Callable, List, NoReturn, Optional, Sequence

from absl import app
from absl import flags

from hml_jax.runtime import errors

EXIT_USER_ERROR = 2  # as argparse and absl use for a command line they cannot parse


def fail(message: str) -> NoReturn:
  """Prints `error: message` on stderr and exits with status 2."""
  sys.stdout.flush()
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def _verbose(argv: Sequence[str] = ()) -> bool:
  """--verbosity >= 1 (read from argv where the flags did not parse)."""
  try:
    if flags.FLAGS.is_parsed():
      return flags.FLAGS['verbosity'].value >= 1
  except (KeyError, flags.Error):
    pass
  for argument in argv:
    match = re.fullmatch(r'--(?:verbosity|v)=(-?\d+)', argument)
    if match:
      return int(match.group(1)) >= 1
  return False


def _override_argument(argv: Sequence[str], key: str) -> str:
  """The `--config.a.b=...` argument of argv that names key, else `--config...` by key."""
  for argument in argv:
    name = argument.split('=', 1)[0]
    if name.startswith('--') and '.' in name and name.rsplit('.', 1)[-1] == key:
      return argument
  return key


def config_error_message(error: BaseException, argv: Sequence[str]) -> str:
  """One line for an exception raised while a config file loads or its overrides apply."""
  if isinstance(error, (AttributeError, KeyError)):
    # ml_collections: AttributeError(KeyError('\'lerning_rate\'\nDid you mean "learning_rate"...'))
    while error.args and isinstance(error.args[0], BaseException):
      error = error.args[0]
    text = str(error.args[0]) if error.args else str(error)
    key = (text.splitlines() or [''])[0].strip('\'" ')
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    hint = (f' Did you mean {suggestion.group(1)!r}?'
            if suggestion else ' `--helpfull` lists the flags; configs/default.py every key.')
    return f'{_override_argument(argv, key)}: the config has no key {key!r}.{hint}'
  if isinstance(error, OSError) and 'Failed loading config file' in str(error):
    tried = [line.strip() for line in str(error).splitlines()[2:] if line.strip()]
    path = tried[0] if tried else '?'
    return (f'--config={path}: no such config file. Give a path to a Python file with '
            'get_config(), e.g. --config=configs/default.py.')
  first_line = (str(error).strip().splitlines() or [''])[0]
  return f'the config could not be loaded: {type(error).__name__}: {first_line}'


def flag_error_message(error: BaseException) -> str:
  """One line for absl's flag error. config_flags wraps an exception that the config file's own
  get_config raises (a bad `--config=FILE:ARGUMENT`) with its traceback: keep its last line."""
  text = str(error)
  if 'Traceback (most recent call last)' in text:
    flag = text.split(': Error whilst parsing config file', 1)[0]
    last = [line for line in text.splitlines() if line.strip()][-1].strip()
    return f'{flag}: {last}'
  return f"{text.rstrip('.')}. `--helpfull` lists the flags."


def _parse_flags(argv: Sequence[str]) -> List[str]:
  """absl's flag parsing, with its errors and the config files' errors as one line each."""
  try:
    remaining = flags.FLAGS(argv)
    # config_flags loads a config file, and may apply its overrides, when the flag is first read.
    # A file that failed to load is an object that raises on its first attribute.
    for name in list(flags.FLAGS):
      getattr(getattr(flags.FLAGS, name), 'to_dict', None)
  except flags.Error as error:
    fail(flag_error_message(error))
  except Exception as error:  # pylint: disable=broad-except; the user's config file or override
    if _verbose(argv):
      raise
    fail(config_error_message(error, argv))
  return remaining


def _with_user_errors(main: Callable[[List[str]], Optional[int]]):

  def wrapped(argv):
    try:
      return main(argv)
    except (errors.UserError, app.UsageError) as error:
      if _verbose():
        raise
      message = str(error)
      if isinstance(error, app.UsageError):
        message = message.rstrip('.') + '. `--help` lists the flags.'
      fail(message)

  return wrapped


def run(main: Callable[[List[str]], Optional[int]], argv: Optional[Sequence[str]] = None) -> None:
  """app.run(main) with user errors as one line and exit status 2 (the module docstring)."""
  argv = list(sys.argv if argv is None else argv)
  app.run(_with_user_errors(main), argv=argv, flags_parser=_parse_flags)


def config_file(path: str) -> str:
  """The config file that --config=PATH[:ARGUMENT] names: PATH itself where it exists (a user's
  own configs/ included), else for configs/NAME.py the config that ships with hml_jax
  (hml_jax.configs: a checkout's configs/, or the installed package's copy), so that the
  documented commands work from any directory after `pip install hml_jax`."""
  file, colon, argument = path.partition(':')
  if not os.path.exists(file) and os.path.dirname(file) in ('configs', ''):
    from hml_jax import configs  # pylint: disable=g-import-not-at-top
    shipped = os.path.join(list(configs.__path__)[0], os.path.basename(file))
    if os.path.exists(shipped):
      file = shipped
  return f'{file}{colon}{argument}'


def define_config_flag(help_string: str, name: str = 'config', flag_values=flags.FLAGS):
  """ml_collections' DEFINE_config_file (--config=FILE[:ARGUMENT] and --config.KEY=VALUE
  overrides), its file found by config_file."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  # The parser class of DEFINE_config_file (a public name of its module, not re-exported).
  from ml_collections.config_flags import config_flags as config_flags_module  # pylint: disable=g-import-not-at-top

  class ShippedConfigParser(config_flags_module.ConfigFileFlagParser):

    def parse(self, path):
      return super().parse(config_file(path))

  holder = config_flags.DEFINE_config_file(name,
                                           None,
                                           help_string,
                                           flag_values=flag_values,
                                           lock_config=True)
  flag_values[name].parser = ShippedConfigParser(name=name, lock_config=True)
  return holder
