"""Weights downloads (hml_jax/runtime/downloads.py, pretrained.weights_file) against an HTTP server that
the test starts on 127.0.0.1; no test touches the internet."""
import hashlib
import http.server
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from hml_jax import models
from hml_jax.init_from import torchvision
from hml_jax.runtime import downloads, errors

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
PTH = os.path.join(FIXTURES, 'torchvision_resnet_small.pth')
with open(PTH, 'rb') as _file:
  CONTENT = _file.read()
DIGEST = hashlib.sha256(CONTENT).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
  """/weights.pth: the fixture; /truncated.pth: half of it, then the connection closes;
  /stall.pth: half of it, then nothing until the test ends; /announced_too_large.pth: a
  Content-Length of ten fixtures, then nothing; /endless.pth: fixture after fixture without a
  Content-Length; /short_length.pth: the fixture under a Content-Length of half of it;
  /long_length.pth: the fixture under a Content-Length of twice it; /trickle.pth: the fixture a
  byte every 20 ms; /slow_headers.pth: a header a byte every 20 ms; /hang_up.pth: the connection
  closed without a response; anything else (under /gone/ too): 404."""
  requests = []
  release = threading.Event()

  def do_GET(self):  # pylint: disable=invalid-name
    type(self).requests.append(self.path)
    name = self.path.rsplit('/', 1)[-1]
    lengths = {
        'announced_too_large.pth': 10 * len(CONTENT),
        'endless.pth': None,
        'short_length.pth': len(CONTENT) // 2,
        'long_length.pth': 2 * len(CONTENT)
    }
    if name == 'hang_up.pth':
      self.close_connection = True
      return
    if name == 'slow_headers.pth':
      self.wfile.write(b'HTTP/1.0 200 OK\r\n')
      self._trickle(b'X-Slow: ' + b'a' * 1000)
      return
    if self.path.startswith('/gone/') or name not in ('weights.pth', 'truncated.pth', 'stall.pth',
                                                      'resnet50-0676ba61.pth', 'trickle.pth',
                                                      *lengths):
      self.send_error(404)
      return
    self.send_response(200)
    length = lengths.get(name, len(CONTENT))
    if length is not None:
      self.send_header('Content-Length', str(length))
    self.end_headers()
    self.close_connection = True
    if name == 'announced_too_large.pth':
      type(self).release.wait(60)
    elif name == 'endless.pth':
      for _ in range(64):  # 64 fixtures, or until the client hangs up
        if not self._write(CONTENT):
          return
    elif name == 'trickle.pth':
      self._trickle(CONTENT)
    elif name in ('truncated.pth', 'stall.pth'):
      self._write(CONTENT[:len(CONTENT) // 2])
      if name == 'stall.pth':
        type(self).release.wait(60)
    else:
      self._write(CONTENT)

  def _write(self, data) -> bool:
    try:
      self.wfile.write(data)
      self.wfile.flush()
      return True
    except OSError:  # the client hung up
      return False

  def _trickle(self, data):
    for i in range(len(data)):
      if type(self).release.wait(0.02) or not self._write(data[i:i + 1]):
        return

  def log_message(self, *args):
    pass


@pytest.fixture
def server():
  _Handler.requests = []
  _Handler.release = threading.Event()
  httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
  thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
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


def test_a_download_error_is_a_users_error():
  assert issubclass(downloads.DownloadError, errors.UserError)
  assert issubclass(downloads.DownloadError, RuntimeError)  # what callers caught before


def _failed_download(url, path, **bounds):
  """The message of the DownloadError that downloads.download(url, path, ...) raises."""
  with pytest.raises(downloads.DownloadError) as error:
    downloads.download(url, str(path), DIGEST, progress=False, advice='Or else.', **bounds)
  message = str(error.value)
  assert message.startswith(f'Could not download {url} (')  # as README's troubleshooting says
  assert f'put it at {path} (its SHA-256 must be {DIGEST}); nothing was written there.' in message
  assert message.endswith(' Or else.')
  return message


def test_a_content_length_above_the_bound_is_refused_before_reading(server, cache):
  start = time.monotonic()
  message = _failed_download(f'{server}/announced_too_large.pth',
                             cache / 'weights.pth',
                             max_bytes=len(CONTENT),
                             deadline_seconds=30)
  # Reading would have waited for the stalled body until the 30 s deadline.
  assert time.monotonic() - start < 10
  assert f'announces {10 * len(CONTENT)} bytes, more than the {len(CONTENT)}' in message
  assert _leftovers(cache) == []


def test_reading_stops_past_the_bound(server, cache):
  message = _failed_download(f'{server}/endless.pth',
                             cache / 'weights.pth',
                             max_bytes=len(CONTENT) + 10)
  assert f'sent more than the {len(CONTENT) + 10} bytes' in message
  assert _leftovers(cache) == []


def test_a_file_of_exactly_the_bound_is_accepted(server, cache):
  path = downloads.download(f'{server}/weights.pth',
                            str(cache / 'weights.pth'),
                            DIGEST,
                            progress=False,
                            max_bytes=len(CONTENT))
  with open(path, 'rb') as f:
    assert f.read() == CONTENT


@pytest.mark.parametrize('name, why', [
    ('short_length.pth', f'SHA-256 {hashlib.sha256(CONTENT[:len(CONTENT) // 2]).hexdigest()}, '
     f'not the expected {DIGEST}'),
    ('long_length.pth', f'stopped after {len(CONTENT)} of {2 * len(CONTENT)} bytes'),
    ('truncated.pth', f'stopped after {len(CONTENT) // 2} of {len(CONTENT)} bytes'),
    ('hang_up.pth', 'Remote end closed connection without response'),
])
def test_a_lying_or_closing_server_leaves_the_cached_file_alone(server, cache, name, why):
  """A Content-Length shorter or longer than the body, or a connection closed early: the error
  says which, and the file already at the target (another version) is not replaced."""
  os.makedirs(cache)
  (cache / 'weights.pth').write_bytes(b'the previous file')
  message = _failed_download(f'{server}/{name}', cache / 'weights.pth', max_bytes=10 * len(CONTENT))
  assert why in message
  assert (cache / 'weights.pth').read_bytes() == b'the previous file'
  assert _leftovers(cache) == ['weights.pth']


@pytest.mark.parametrize('name', ['trickle.pth', 'slow_headers.pth'])
def test_a_trickling_server_is_stopped_at_the_deadline(server, cache, name):
  """A byte every 20 ms never trips the per-read timeout (60 s) but passes the overall deadline,
  in the body and in the headers alike."""
  start = time.monotonic()
  message = _failed_download(f'{server}/{name}', cache / 'weights.pth', deadline_seconds=0.5)
  elapsed = time.monotonic() - start
  assert 0.5 <= elapsed < 5
  assert 'not complete after the deadline of 0.5 s' in message
  assert downloads.DEADLINE_ENVIRONMENT_VARIABLE in message
  assert _leftovers(cache) == []


def test_the_default_deadline(monkeypatch):
  monkeypatch.delenv(downloads.DEADLINE_ENVIRONMENT_VARIABLE, raising=False)
  resnet50 = torchvision.IMAGENET_WEIGHTS['resnet50'].max_bytes
  # 108 MiB at 100 kB/s: 19 minutes; a small file still gets the minimum.
  assert downloads.default_deadline(resnet50) == pytest.approx(108 * 2**20 / 1e5)
  assert downloads.default_deadline(1000) == downloads.MINIMUM_DEADLINE_SECONDS
  assert downloads.default_deadline(None) == downloads.UNBOUNDED_DEADLINE_SECONDS
  monkeypatch.setenv(downloads.DEADLINE_ENVIRONMENT_VARIABLE, '3600')
  assert downloads.default_deadline(resnet50) == 3600
  for value in ('soon', '0', '-5', 'inf', 'nan'):
    monkeypatch.setenv(downloads.DEADLINE_ENVIRONMENT_VARIABLE, value)
    with pytest.raises(errors.InvalidInputError, match=f'HML_JAX_DOWNLOAD_DEADLINE={value!r}'):
      downloads.default_deadline(resnet50)


def test_every_named_weights_file_has_a_size_bound():
  for weights in torchvision.IMAGENET_WEIGHTS.values():
    # torchvision's documented sizes are 44.7-170.5 MB; each bound is about 1.1 times that.
    assert 40 * 2**20 < weights.max_bytes < 200 * 2**20


def test_named_weights_are_downloaded_within_their_bound(server, cache, monkeypatch):
  monkeypatch.setitem(
      torchvision.IMAGENET_WEIGHTS, 'resnet50',
      torchvision.WeightsFile(f'{server}/endless.pth', DIGEST, max_bytes=len(CONTENT)))
  with pytest.raises(downloads.DownloadError,
                     match=f'sent more than the {len(CONTENT)} bytes.*' +
                     re.escape(torchvision.DOWNLOAD_ADVICE)):
    torchvision.weights_file('torchvision:resnet50', progress=False)
  assert _leftovers(cache) == []


@pytest.fixture
def fake_imagenet_weights(server, monkeypatch):
  """'torchvision:resnet50' served by the local server: the fixture under torchvision's name."""
  monkeypatch.setitem(torchvision.IMAGENET_WEIGHTS, 'resnet50',
                      torchvision.WeightsFile(f'{server}/resnet50-0676ba61.pth', DIGEST))


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
  variables = torchvision.init_variables_from('torchvision:resnet50', backbone, images.shape)
  features = np.asarray(backbone.apply(variables, images, train=False))
  np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
  assert os.path.isfile(cache / 'resnet50-0676ba61.pth')
  torchvision.init_variables_from('torchvision:resnet50', backbone, images.shape)
  assert len(_Handler.requests) == 1


def test_torchvision_cache_is_used_without_download(fake_imagenet_weights, cache, tmp_path):
  del fake_imagenet_weights
  hub = tmp_path / 'torch_home' / 'hub' / 'checkpoints'
  os.makedirs(hub)
  (hub / 'resnet50-0676ba61.pth').write_bytes(CONTENT)
  assert torchvision.weights_file('torchvision:resnet50') == str(hub / 'resnet50-0676ba61.pth')
  assert _Handler.requests == [] and _leftovers(cache) == []


def test_spec_checks(cache):
  from hml_jax import init_from  # pylint: disable=g-import-not-at-top
  init_from.check('torchvision:resnet50', 'resnet50')
  init_from.check('torchvision:/x/weights.safetensors', 'resnet50')
  with pytest.raises(ValueError,
                     match=r"weights of resnet50, but config\.model is 'resnet18'.*"
                     r'init_from=torchvision:resnet18'):
    init_from.check('torchvision:resnet50', 'resnet18')
  with pytest.raises(ValueError, match=r"'resnet_tiny'.*no ImageNet weights.*init_from=''"):
    init_from.check('torchvision:resnet50', 'resnet_tiny')
  with pytest.raises(ValueError, match="'resnet152' is neither"):
    init_from.check('torchvision:resnet152')
  with pytest.raises(ValueError, match="expected 'torchvision:resnet50'"):
    init_from.check('imagenet:resnet50')
  assert _leftovers(cache) == []  # checking reads and downloads nothing


def test_paper_config_offline_fails_at_once_before_any_other_work(server, cache, tmp_path,
                                                                  monkeypatch):
  """configs/voc.py as shipped names ImageNet weights; with an empty cache and no network the run
  stops with the download error before reading any data (the manual_dir does not even exist)."""
  from hml_jax.configs import voc  # pylint: disable=g-import-not-at-top
  from hml_jax.training import train  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(
      torchvision.IMAGENET_WEIGHTS, 'resnet50',
      torchvision.WeightsFile(f'{server}/gone/resnet50-0676ba61.pth',
                              torchvision.IMAGENET_WEIGHTS['resnet50'].sha256))
  config = voc.get_config()
  assert config.init_from == 'torchvision:resnet50'
  config.dataset.manual_dir = str(tmp_path / 'manual')  # present (checked first) and empty
  os.makedirs(config.dataset.manual_dir)
  config.dataset.data_dir = str(tmp_path / 'tfds')
  with pytest.raises(downloads.DownloadError) as error:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  message = str(error.value)
  assert message.startswith(f'Could not download {server}/gone/resnet50-0676ba61.pth (HTTP 404 ')
  assert str(cache / 'resnet50-0676ba61.pth') in message and message.endswith(
      torchvision.DOWNLOAD_ADVICE)
  assert '0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a' in message
  assert not os.path.exists(tmp_path / 'tfds') and _leftovers(cache) == []


def test_a_missing_weights_path_fails_before_any_other_work(tmp_path):
  from hml_jax.configs import voc  # pylint: disable=g-import-not-at-top
  from hml_jax.training import train  # pylint: disable=g-import-not-at-top
  config = voc.get_config()
  config.init_from = f'torchvision:{tmp_path}/resnet50.safetensors'
  config.dataset.manual_dir = str(tmp_path / 'manual')
  os.makedirs(config.dataset.manual_dir)
  config.dataset.data_dir = str(tmp_path / 'tfds')
  with pytest.raises(FileNotFoundError, match=r'no file .*resnet50\.safetensors'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'tfds')


def test_from_scratch_warns_once(caplog):
  from hml_jax import init_from  # pylint: disable=g-import-not-at-top
  from hml_jax.configs import voc  # pylint: disable=g-import-not-at-top
  config = voc.get_config()
  config.init_from = ''
  init_from.fetch(config.init_from, config.model)
  warnings = [r for r in caplog.records if 'starts from random weights' in r.getMessage()]
  assert len(warnings) == 1 and warnings[0].levelname == 'WARNING'
  assert 'torchvision:resnet50' in warnings[0].getMessage()
