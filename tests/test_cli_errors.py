"""Every user mistake of docs/reliability.md's table "User mistakes", through the real command
line: exit status 2, one `error: ...` line that names what is wrong, no traceback, and at most a
few lines of hml_jax's own output (library banners aside)."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = '--config=configs/tiny.py'

# Lines that libraries print whatever hml_jax does (TensorFlow's C++ start-up, matplotlib's font
# cache): not hml_jax's output.
LIBRARY_BANNERS = ('oneDNN custom operations', 'absl::InitializeLog', 'fontManager',
                   'Variant folder', 'cuda_', 'TF-TRT', 'computation placer', 'Unable to register')
MAX_OWN_LINES = 4


def run_tool(module, *arguments, env=None, cwd=ROOT, stdin=None):
  environment = dict(os.environ, HML_JAX_MALLOC='system', **(env or {}))
  return subprocess.run([sys.executable, '-m', module, *map(str, arguments)],
                        cwd=cwd,
                        env=environment,
                        capture_output=True,
                        text=True,
                        stdin=stdin,
                        timeout=300,
                        check=False)


def own_lines(result):
  lines = (result.stdout + result.stderr).splitlines()
  return [line for line in lines if line.strip() and not any(b in line for b in LIBRARY_BANNERS)]


def assert_user_error(result, expected):
  lines = own_lines(result)
  output = '\n'.join(lines)
  assert result.returncode == 2, output[-3000:]
  assert 'Traceback' not in output, output[-3000:]
  errors = [line for line in lines if line.startswith('error: ')]
  assert len(errors) == 1, output[-3000:]
  assert expected in errors[0], errors[0]
  assert len(lines) <= MAX_OWN_LINES, output


@pytest.fixture(scope='module')
def trained(tmp_path_factory, tfds_dir):
  """A finished 1-epoch tiny run."""
  workdir = tmp_path_factory.mktemp('cli_errors') / 'trained'
  result = run_tool('hml_jax.main', TINY, f'--workdir={workdir}', '--config.num_epochs=1',
                    f'--config.dataset.data_dir={tfds_dir}')
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def _folder(tmp_path, csv_bytes=b'filename,labels\na.png,cat\n'):
  folder = tmp_path / 'images'
  folder.mkdir()
  (folder / 'train.csv').write_bytes(csv_bytes)
  return folder


def _syntax_error_config(tmp_path):
  path = tmp_path / 'broken.py'
  path.write_text('def get_config(:\n  pass\n')
  return path


def _truncated_npz(tmp_path):
  path = tmp_path / 'features.npz'
  np.savez(path, train_features=np.zeros((8, 4)), train_labels=np.zeros((8, 2)))
  path.write_bytes(path.read_bytes()[:100])
  return path


# (id, tool, arguments (a function of tmp_path), what the error line says). Each is a row of
# docs/reliability.md's "User mistakes".
MAIN_CASES = [
    ('mistyped_key', lambda t: [TINY, '--config.lerning_rate=0.1'],
     "no key 'lerning_rate'. Did you mean 'learning_rate'?"),
    ('mistyped_nested_key', lambda t: [TINY, '--config.dataset.nme=x'], "no key 'nme'"),
    ('value_of_wrong_type', lambda t: [TINY, '--config.num_epochs=ten'], '--config.num_epochs=ten'),
    ('unknown_loss', lambda t: [TINY, '--config.loss=hmll'], "Unknown loss 'hmll'"),
    ('unknown_scenario', lambda t: [TINY, '--config.label_scenario=single'],
     "Unknown label scenario 'single'"),
    ('unknown_model', lambda t: [TINY, '--config.model=resnet51'], "Unknown model 'resnet51'"),
    ('unknown_recipe', lambda t: [TINY, '--config.recipe=paper'], "config.recipe='paper'"),
    ('missing_config_file', lambda t: ['--config=configs/nope.py'], 'no such config file'),
    ('config_file_with_syntax_error', lambda t: [f'--config={_syntax_error_config(t)}'],
     'SyntaxError'),
    ('config_argument_unknown', lambda t: ['--config=configs/glyph_digits.py:glyph_resnet'],
     'glyph_resnet: not a shipped backbone; use one of'),
    ('unknown_flag', lambda t: [TINY, '--epochs=3'], "Unknown command line flag 'epochs'"),
    ('extra_argument', lambda t: [TINY, 'configs/tiny.py'], 'Unexpected arguments'),
    ('batch_size_zero', lambda t: [TINY, '--config.batch_size=0'], 'config.batch_size=0'),
    ('no_epochs', lambda t: [TINY, '--config.num_epochs=0'], 'config.num_epochs must be positive'),
    ('margin_too_large', lambda t: [TINY, '--config.margin=2.5'], 'config.margin=2.5'),
    ('fraction_out_of_range',
     lambda t: [TINY, '--config.label_scenario=partial_positive', '--config.positive_fraction=1.5'],
     'config.positive_fraction=1.5'),
    ('unknown_dataset', lambda t: [TINY, '--config.dataset.name=voc'], "Unknown dataset 'voc'"),
    ('folder_config_without_path', lambda t: ['--config=configs/folder.py'],
     'config.dataset.path is empty'),
    ('folder_that_does_not_exist',
     lambda t: ['--config=configs/folder.py', f'--config.dataset.path={t}/nowhere'],
     'nowhere (config.dataset.path) does not exist'),
    ('folder_without_train_csv', lambda t:
     ['--config=configs/folder.py', f'--config.dataset.path={(t / "empty").mkdir() or t}/empty'],
     'train.csv does not exist'),
    ('csv_with_wrong_header', lambda t: [
        '--config=configs/folder.py',
        f'--config.dataset.path={_folder(t, b"file,label" + bytes([10]) + b"a.png,cat")}'
    ], 'line 1 must be the header'),
    ('csv_with_bad_row', lambda t: [
        '--config=configs/folder.py',
        f'--config.dataset.path={_folder(t, b"filename,labels" + bytes([10]) + b"a.png,cat,dog")}'
    ], 'line 2 has 3 columns'),
    ('features_file_missing',
     lambda t: ['--config=configs/features.py', f'--config.dataset.path={t}/f.npz'],
     'f.npz (config.dataset.path) does not exist'),
    ('features_file_truncated',
     lambda t: ['--config=configs/features.py', f'--config.dataset.path={_truncated_npz(t)}'],
     'is not an .npz file'),
    ('paper_dataset_without_its_files',
     lambda t: ['--config=configs/voc.py', f'--config.dataset.manual_dir={t}/VOCdevkit'],
     'VOCdevkit does not exist'),
    ('weights_file_missing', lambda t: [
        '--config=configs/folder.py', f'--config.dataset.path={_folder(t)}',
        '--config.model=resnet18', f'--config.init_from=torchvision:{t}/resnet18.pth'
    ], "resnet18.pth': no file"),
    ('init_from_unknown_spec',
     lambda t: ['--config=configs/folder.py', '--config.init_from=imagenet'],
     "Unsupported pretrained-weights spec 'imagenet'"),
    ('init_from_workdir_without_run', lambda t: [
        '--config=configs/folder.py', f'--config.dataset.path={_folder(t)}',
        f'--config.init_from=workdir:{t}'
    ], 'holds no hml_jax run'),
    ('image_size_of_another_dataset', lambda t: [TINY, '--config.image_size=48'],
     'config.image_size is 48'),
]


@pytest.mark.slow
@pytest.mark.parametrize('arguments, expected',
                         [pytest.param(a, e, id=name) for name, a, e in MAIN_CASES])
def test_a_user_mistake_in_training_is_one_line_and_status_2(arguments, expected, tmp_path,
                                                             tfds_dir):
  workdir = tmp_path / 'run'
  result = run_tool('hml_jax.main', *arguments(tmp_path), f'--workdir={workdir}',
                    f'--config.dataset.data_dir={tfds_dir}')
  assert_user_error(result, expected)
  assert not (workdir / 'checkpoints').exists()  # refused before any work


@pytest.mark.slow
def test_missing_workdir_flag_is_one_line():
  assert_user_error(run_tool('hml_jax.main', TINY), 'Flag --workdir must have a value')


@pytest.mark.slow
def test_offline_without_the_weights_names_the_url_and_where_to_put_the_file(tmp_path):
  # A proxy on a closed port: the download fails at once, as without a network.
  env = {
      'HML_JAX_CACHE': str(tmp_path / 'cache'),
      'TORCH_HOME': str(tmp_path / 'torch'),
      'https_proxy': 'http://127.0.0.1:9',
      'HTTPS_PROXY': 'http://127.0.0.1:9',
  }
  result = run_tool('hml_jax.main',
                    '--config=configs/folder.py',
                    f'--config.dataset.path={_folder(tmp_path)}',
                    f'--workdir={tmp_path / "run"}',
                    env=env)
  assert_user_error(result, 'Could not download https://download.pytorch.org/models/resnet50')


@pytest.mark.slow
def test_resuming_with_another_config_is_one_line(trained, tmp_path, tfds_dir):
  copy = tmp_path / 'copy'
  shutil.copytree(trained, copy)
  result = run_tool('hml_jax.main', TINY, f'--workdir={copy}', '--config.loss=an',
                    f'--config.dataset.data_dir={tfds_dir}')
  assert_user_error(result, 'holds a run made with a different config')


@pytest.mark.slow
def test_a_truncated_config_json_is_one_line_naming_it(trained, tmp_path, tfds_dir):
  copy = tmp_path / 'copy'
  shutil.copytree(trained, copy)
  text = (copy / 'config.json').read_text()
  (copy / 'config.json').write_text(text[:len(text) // 2])
  result = run_tool('hml_jax.main', TINY, f'--workdir={copy}',
                    f'--config.dataset.data_dir={tfds_dir}')
  assert_user_error(result, 'config.json')
  assert (copy / 'config.json').read_text() == text[:len(text) // 2]  # nothing the user had lost


@pytest.mark.slow
def test_a_workdir_in_use_is_one_line(tmp_path, tfds_dir):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  holder = subprocess.Popen([
      sys.executable, '-c', 'import sys, time\n'
      'from hml_jax import checkpoints\n'
      'with checkpoints.WorkdirLock(sys.argv[1]):\n'
      '  print("held", flush=True)\n'
      '  time.sleep(120)\n', workdir
  ],
                            cwd=ROOT,
                            stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    result = run_tool('hml_jax.main', TINY, f'--workdir={workdir}',
                      f'--config.dataset.data_dir={tfds_dir}')
  finally:
    holder.kill()
    holder.wait()
  assert_user_error(result, f'is in use by process {holder.pid}')


@pytest.mark.slow
@pytest.mark.parametrize('tool, arguments, expected', [
    ('hml_jax.main', ['--mode=eval'], 'holds no hml_jax run'),
    ('hml_jax.predict', ['x.png'], 'holds no hml_jax run'),
    ('hml_jax.analyze', [], 'holds no hml_jax run'),
],
                         ids=['eval', 'predict', 'analyze'])
def test_reading_a_workdir_that_holds_no_run_is_one_line(tool, arguments, expected, tmp_path):
  assert_user_error(run_tool(tool, f'--workdir={tmp_path}', *arguments), expected)


@pytest.mark.slow
def test_predicting_an_image_that_does_not_exist_is_one_line(trained, tmp_path):
  result = run_tool('hml_jax.predict', f'--workdir={trained}', tmp_path / 'missing.png')
  assert_user_error(result, 'missing.png')


@pytest.mark.slow
def test_predicting_a_file_that_is_not_an_image_is_one_line(trained, tmp_path):
  path = tmp_path / 'notes.png'
  path.write_text('not an image')
  result = run_tool('hml_jax.predict', f'--workdir={trained}', path)
  assert_user_error(result, 'notes.png')


@pytest.mark.slow
def test_compare_with_an_unknown_method_is_one_line(tmp_path):
  result = run_tool('hml_jax.compare', TINY, f'--workdir={tmp_path}', '--methods=hmll')
  assert_user_error(result, "Unknown loss 'hmll'")


@pytest.mark.slow
def test_verbosity_1_shows_the_traceback_of_a_user_error(tmp_path):
  result = run_tool('hml_jax.main', TINY, f'--workdir={tmp_path}', '--config.loss=hmll',
                    '--verbosity=1')
  assert result.returncode != 0 and 'Traceback' in result.stderr
