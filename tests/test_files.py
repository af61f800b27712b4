"""Workdir files: local paths are written atomically; bucket URLs are never made local."""
from hml_jax import files


def test_local_json_round_trip_and_atomic_replace(tmp_path):
  path = str(tmp_path / 'a' / 'b.json')
  files.makedirs(tmp_path / 'a')
  files.write_json(path, {'x': [1, 2]})
  files.write_json(path, {'x': [3]})
  assert files.read_json(path) == {'x': [3]}
  assert files.listdir(tmp_path / 'a') == ['b.json']  # no temporary file left behind
  files.rename(path, str(tmp_path / 'a' / 'c.json'))
  assert files.exists(tmp_path / 'a' / 'c.json') and not files.exists(path)


def test_bucket_urls_stay_urls():
  assert not files.is_local('gs://bucket/run')
  assert files.absolute('gs://bucket/run') == 'gs://bucket/run'
  assert files.join('gs://bucket/run', 'checkpoints') == 'gs://bucket/run/checkpoints'
  assert files.is_local('runs/x') and files.absolute('runs/x').startswith('/')
