"""Weights downloads (hml_jax/downloads.py, pretrained.weights_file) against an HTTP server that
the test starts on 127.0.0.1; no test touches the internet."""
import hashlib
import http.server
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from hml_jax import downloads, models, pretrained

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
PTH = os.path.join(FIXTURES, 'torchvision_resnet_small.pth')
with open(PTH, 'rb') as _file:
  CONTENT = _file.read()
DIGEST = hashlib.sha256(CONTENT).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
  """/weights.pth: the fixture; /truncated.pth: half of it, then the connection closes;
  /stall.pth: half of it, then nothing until the test ends; anything else: 404."""
  requests = []
  release = threading.Event()

  def do_GET(self):  # pylint: disable=invalid-name
    type(self).requests.append(self.path)
    name = self.path.rsplit('/', 1)[-1]
    if name not in ('weights.pth', 'truncated.pth', 'stall.pth', 'resnet50-0676ba61.pth'):
      self.send_error(404)
      return
    self.send_response(200)
    self.send_header('Content-Length', str(len(CONTENT)))
    self.end_headers()
    if name in ('weights.pth', 'resnet50-0676ba61.pth'):
      self.wfile.write(CONTENT)
      return
    self.wfile.write(CONTENT[:len(CONTENT) // 2])
    self.wfile.flush()
    if name == 'stall.pth':
      type(self).release.wait(60)
    self.close_connection = True

  def log_message(self, *args):
    pass


@pytest.fixture
def server():
  _Handler.requests = []
  _Handler.release = threading.Event()
  httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield f'http://127.0.0.1:{httpd.server_address[1]}'
  _Handler.release.set()
  httpd.shutdown()
  httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
  directory = tmp_path / 'cache'
  monkeypatch.setenv('HML_JAX_CACHE', str(directory))
  monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
  return directory


def _leftovers(directory):
  return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def test_good_digest_downloads_once_then_reuses_the_cache(server, cache, capsys):
  url = f'{server}/weights.pth'
  path = downloads.cached_or_download(url, DIGEST, 'weights.pth')
  assert path == str(cache / 'weights.pth')
  with open(path, 'rb') as f:
    assert f.read() == CONTENT
  assert _leftovers(cache) == ['weights.pth']  # no temporary file left
  assert f'Downloading {url} to {path}: ' in capsys.readouterr().err  # progress, not a tty
  assert downloads.cached_or_download(url, DIGEST, 'weights.pth') == path
  assert _Handler.requests == ['/weights.pth']  # the second call did not download


def test_wrong_digest_leaves_nothing_and_says_where_to_put_the_file(server, cache):
  url, expected = f'{server}/weights.pth', '0' * 64
  with pytest.raises(downloads.DownloadError) as error:
    downloads.cached_or_download(url, expected, 'weights.pth', progress=False)
  message = str(error.value)
  assert f'SHA-256 {DIGEST}, not the expected {expected}' in message
  assert url in message and str(cache / 'weights.pth') in message
  assert _leftovers(cache) == []


def test_truncated_transfer_leaves_nothing(server, cache):
  url = f'{server}/truncated.pth'
  with pytest.raises(downloads.DownloadError) as error:
    downloads.cached_or_download(url, DIGEST, progress=False)
  message = str(error.value)
  assert url in message and str(cache / 'truncated.pth') in message and DIGEST in message
  assert _leftovers(cache) == []


def test_server_gone_is_a_clear_error(cache):
  httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
  url = f'http://127.0.0.1:{httpd.server_address[1]}/weights.pth'
  httpd.server_close()  # nothing listens there any more
  with pytest.raises(downloads.DownloadError,
                     match=r'Could not download .*weights\.pth .*put it at .*weights\.pth .*' +
                     DIGEST):
    downloads.cached_or_download(url, DIGEST, progress=False)
  assert _leftovers(cache) == []


def test_a_killed_download_leaves_no_file_that_a_later_run_trusts(server, cache):
  url, path = f'{server}/stall.pth', str(cache / 'weights.pth')
  child = subprocess.Popen([
      sys.executable, '-c', 'import sys; from hml_jax import downloads; '
      'downloads.download(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)', url, path, DIGEST
  ],
                           cwd=os.path.dirname(FIXTURES) + '/..')
  deadline = time.time() + 60
  while time.time() < deadline and not any(
      name.endswith('.part') and os.path.getsize(cache / name) > 0 for name in _leftovers(cache)):
    time.sleep(0.05)
  child.send_signal(signal.SIGKILL)
  child.wait()
  assert not os.path.exists(path)  # only the temporary .part file, which nothing reads
  (part,) = _leftovers(cache)
  old = time.time() - downloads.STALE_PART_SECONDS - 1
  os.utime(cache / part, (old, old))  # the next download removes it once it is stale
  assert downloads.cached_or_download(f'{server}/weights.pth',
                                      DIGEST,
                                      'weights.pth',
                                      progress=False) == path
  with open(path, 'rb') as f:
    assert f.read() == CONTENT
  assert _leftovers(cache) == ['weights.pth']


def test_a_damaged_cached_file_is_an_error_and_is_kept(server, cache):
  os.makedirs(cache)
  (cache / 'weights.pth').write_bytes(b'damaged')
  with pytest.raises(downloads.DownloadError, match='damaged or another file'):
    downloads.cached_or_download(f'{server}/weights.pth', DIGEST, 'weights.pth')
  assert (cache / 'weights.pth').read_bytes() == b'damaged' and _Handler.requests == []


@pytest.fixture
def fake_imagenet_weights(server, monkeypatch):
  """'torchvision:resnet50' served by the local server: the fixture under torchvision's name."""
  monkeypatch.setitem(pretrained.IMAGENET_WEIGHTS, 'resnet50',
                      pretrained.WeightsFile(f'{server}/resnet50-0676ba61.pth', DIGEST))


def _small_backbone_and_features():
  with np.load(os.path.join(FIXTURES, 'torchvision_resnet_small.npz')) as data:
    backbone = models.get_backbone('resnet50',
                                   stage_sizes=tuple(int(n) for n in data['stage_sizes']),
                                   widths=tuple(int(w) for w in data['widths']),
                                   stem_width=int(data['stem_width']))
    return backbone, data['images'].transpose(0, 2, 3, 1), data['features']


@pytest.mark.slow
def test_named_weights_download_load_and_give_torchvision_features(fake_imagenet_weights, cache):
  del fake_imagenet_weights
  backbone, images, expected = _small_backbone_and_features()
  variables = pretrained.init_variables_from('torchvision:resnet50', backbone, images.shape)
  features = np.asarray(backbone.apply(variables, images, train=False))
  np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
  assert os.path.isfile(cache / 'resnet50-0676ba61.pth')
  pretrained.init_variables_from('torchvision:resnet50', backbone, images.shape)
  assert len(_Handler.requests) == 1


def test_torchvision_cache_is_used_without_download(fake_imagenet_weights, cache, tmp_path):
  del fake_imagenet_weights
  hub = tmp_path / 'torch_home' / 'hub' / 'checkpoints'
  os.makedirs(hub)
  (hub / 'resnet50-0676ba61.pth').write_bytes(CONTENT)
  assert pretrained.weights_file('torchvision:resnet50') == str(hub / 'resnet50-0676ba61.pth')
  assert _Handler.requests == [] and _leftovers(cache) == []


def test_spec_checks(cache):
  pretrained.check_spec('torchvision:resnet50', 'resnet50')
  pretrained.check_spec('torchvision:/x/weights.safetensors', 'resnet50')
  with pytest.raises(ValueError,
                     match=r"weights of resnet50, but config\.model is 'resnet18'.*"
                     r'init_from=torchvision:resnet18'):
    pretrained.check_spec('torchvision:resnet50', 'resnet18')
  with pytest.raises(ValueError, match=r"'resnet_tiny'.*no ImageNet weights.*init_from=''"):
    pretrained.check_spec('torchvision:resnet50', 'resnet_tiny')
  with pytest.raises(ValueError, match="'resnet152' is neither"):
    pretrained.check_spec('torchvision:resnet152')
  with pytest.raises(ValueError, match="expected 'torchvision:resnet50'"):
    pretrained.check_spec('imagenet:resnet50')
  assert _leftovers(cache) == []  # checking reads and downloads nothing


def test_paper_config_offline_fails_at_once_before_any_other_work(server, cache, tmp_path,
                                                                  monkeypatch):
  """configs/voc.py as shipped names ImageNet weights; with an empty cache and no network the run
  stops with the download error before reading any data (the manual_dir does not even exist)."""
  from configs import voc  # pylint: disable=g-import-not-at-top
  from hml_jax import train  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(
      pretrained.IMAGENET_WEIGHTS, 'resnet50',
      pretrained.WeightsFile(f'{server}/gone/resnet50-0676ba61.pth',
                             pretrained.IMAGENET_WEIGHTS['resnet50'].sha256))
  config = voc.get_config()
  assert config.init_from == 'torchvision:resnet50'
  config.dataset.manual_dir = str(tmp_path / 'no_such_dir')
  config.dataset.data_dir = str(tmp_path / 'tfds')
  with pytest.raises(downloads.DownloadError) as error:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  message = str(error.value)
  assert 'resnet50-0676ba61.pth' in message and str(cache) in message
  assert '0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a' in message
  assert not os.path.exists(tmp_path / 'tfds') and _leftovers(cache) == []


def test_a_missing_weights_path_fails_before_any_other_work(tmp_path):
  from configs import voc  # pylint: disable=g-import-not-at-top
  from hml_jax import train  # pylint: disable=g-import-not-at-top
  config = voc.get_config()
  config.init_from = f'torchvision:{tmp_path}/resnet50.safetensors'
  config.dataset.manual_dir = str(tmp_path / 'no_such_dir')
  config.dataset.data_dir = str(tmp_path / 'tfds')
  with pytest.raises(FileNotFoundError, match=r'no file .*resnet50\.safetensors'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'tfds')


def test_from_scratch_warns_once(caplog):
  from hml_jax import train  # pylint: disable=g-import-not-at-top
  from configs import voc  # pylint: disable=g-import-not-at-top
  config = voc.get_config()
  config.init_from = ''
  train.announce_initialization(config)
  warnings = [r for r in caplog.records if 'starts from random weights' in r.getMessage()]
  assert len(warnings) == 1 and warnings[0].levelname == 'WARNING'
  assert 'torchvision:resnet50' in warnings[0].getMessage()
