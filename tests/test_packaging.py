"""pyproject.toml: installable with pip (`pip install .`, `pip install git+URL`), with the
dependencies of requirements.txt."""
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _requirements():
  with open(os.path.join(ROOT, 'requirements.txt')) as f:
    lines = [line.split('#')[0].strip() for line in f]
  return [line for line in lines if line]


def test_pyproject_dependencies_equal_requirements():
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    project = tomllib.load(f)['project']

  def normalize(requirement):
    return re.sub(r'\s+', '', requirement.replace("'", '"'))

  assert sorted(map(normalize, project['dependencies'])) == sorted(map(normalize, _requirements()))


def test_every_python_package_is_listed():
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    setuptools = tomllib.load(f)['tool']['setuptools']
  packages = set(setuptools['packages'])
  # A package installed from another folder (hml_jax.configs from configs/, which a checkout
  # reaches through hml_jax/configs/__init__.py) counts by that folder too.
  packages |= set(setuptools.get('package-dir', {}).values())
  found = {
      os.path.relpath(directory, ROOT).replace(os.sep, '.')
      for directory, _, names in os.walk(ROOT)
      if '__init__.py' in names and not any(
          part.startswith('.') or part in ('tests', 'build', 'dist') or part.endswith('.egg-info')
          for part in os.path.relpath(directory, ROOT).split(os.sep))
  }
  assert found == packages


def test_installed_configs_are_found_from_any_directory(tmp_path, monkeypatch):
  from hml_jax.tools import cli  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  assert cli.config_file('configs/tiny.py:x') == f"{os.path.join(ROOT, 'configs', 'tiny.py')}:x"
  assert cli.config_file('configs/absent.py') == 'configs/absent.py'
  (tmp_path / 'configs').mkdir()
  (tmp_path / 'configs' / 'tiny.py').write_text('# a user\'s own')
  assert cli.config_file('configs/tiny.py') == 'configs/tiny.py'  # a file here is the user's


def test_the_config_flag_loads_a_shipped_config_from_another_directory(tmp_path, monkeypatch):
  """The flag itself finds it (argv is not rewritten), and --config.KEY overrides apply."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from hml_jax.tools import cli  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  flag_values = flags.FlagValues()
  argv = ['main', '--config=configs/tiny.py', '--config.loss=an']
  monkeypatch.setattr(sys, 'argv', argv)
  holder = cli.define_config_flag('a config', flag_values=flag_values)
  flag_values(argv)
  assert holder.value.loss == 'an'
  assert holder.value.dataset.name == 'composite_digits'


@pytest.mark.slow
def test_pip_installed_package_trains_from_another_directory(tmp_path, tfds_dir):
  """`pip install .` (without dependencies, into a folder: the venv has them) and a tiny run
  started elsewhere, with the config named as the docs say."""
  target, source = tmp_path / 'site', tmp_path / 'source'
  # A copy, so that the build's own files (build/, *.egg-info) never land in the repository.
  shutil.copytree(ROOT,
                  source,
                  ignore=shutil.ignore_patterns('.venv', '.git', 'runs', 'build', '*.egg-info',
                                                '__pycache__'))
  subprocess.run([
      sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--no-build-isolation', '--target',
      str(target),
      str(source)
  ],
                 check=True,
                 cwd=tmp_path)
  # The configs install inside the package: no top-level `configs` to collide with a user's.
  assert not (target / 'configs').exists()
  assert (target / 'hml_jax' / 'configs' / 'default.py').exists()
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  environment = {**os.environ, 'PYTHONPATH': str(target)}
  result = subprocess.run([
      sys.executable, '-m', 'hml_jax.main', '--config=configs/tiny.py', '--workdir=run',
      f'--config.dataset.data_dir={tfds_dir}', '--config.num_epochs=1'
  ],
                          cwd=elsewhere,
                          env=environment,
                          capture_output=True,
                          text=True,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (elsewhere / 'run' / 'results.json').exists()
  # The console commands, from the scripts pip wrote: hml-eval on that run, hml-train --help.
  results = json.loads((elsewhere / 'run' / 'results.json').read_text())
  evaluated = subprocess.run([str(target / 'bin' / 'hml-eval'), '--workdir=run'],
                             cwd=elsewhere,
                             env=environment,
                             capture_output=True,
                             text=True,
                             check=False)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert f"mAP {results['test_map']:.2f}" in evaluated.stdout
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    commands = tomllib.load(f)['project']['scripts']
  for command in commands:
    assert (target / 'bin' / command).exists(), command


def test_console_commands_name_tools_that_exist():
  """Each [project.scripts] entry is a function of console_scripts that runs a module with a
  command-line entry (`if __name__ == '__main__':`)."""
  from hml_jax import console_scripts  # pylint: disable=g-import-not-at-top
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    commands = tomllib.load(f)['project']['scripts']
  for command, target in commands.items():
    module, function = target.split(':')
    assert module == 'hml_jax.console_scripts', command
    tool = getattr(console_scripts, function).args[0]  # functools.partial(_as_main, module)
    with open(os.path.join(ROOT, *tool.split('.')) + '.py') as f:
      assert "if __name__ == '__main__':" in f.read(), (command, tool)
