"""The console output of a run: one line per epoch, a progress bar on a terminal only."""
import io

from hml_jax.runtime import console


def test_duration():
  assert console.duration(0) == '0:00'
  assert console.duration(65) == '1:05'
  assert console.duration(3665) == '1:01:05'


def test_epoch_line_has_the_numbers_and_an_eta():
  line = console.epoch_line(3, 10, 0.12345, 55.123, 54.3, 20.1, 0.29, 410.4, 45.0, 7)
  assert line == ('Epoch 3/10: loss 0.1235, val mAP 55.12, test mAP 54.30, s* 20.10, '
                  'm* 0.2900, 410 img/s, 0:45 elapsed, ETA 1:45')
  last = console.epoch_line(10, 10, 0.1, 50.0, 50.0, None, None, 400.0, 150.0, 0)
  assert 's*' not in last and 'ETA' not in last and last.endswith('2:30 elapsed')


class Terminal(io.StringIO):

  def isatty(self):
    return True


def test_progress_bar_draws_on_a_terminal_and_clears_itself():
  stream = Terminal()
  bar = console.ProgressBar(stream=stream, interval=0.0, width=10)
  bar.start('Epoch 1/2', 4)
  for step in range(1, 5):
    bar.update(step, 32)
  bar.clear()
  text = stream.getvalue()
  assert text.count('\r') == 5 and '[##########] 4/4 steps' in text and '\n' not in text
  assert text.endswith('\r\033[K')


def test_progress_bar_is_silent_in_a_file_or_on_other_processes():
  for stream, enabled in ((io.StringIO(), True), (Terminal(), False)):
    bar = console.ProgressBar(stream=stream, enabled=enabled, interval=0.0)
    bar.start('Epoch 1/1', 3)
    bar.update(3, 8)
    bar.clear()
    assert stream.getvalue() == ''
