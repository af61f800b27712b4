"""What a training run shows on the console: one line per epoch, and a progress bar within the
epoch when the output is a terminal (redrawn in place; nothing when it is a file or a pipe, so a
log or CI output holds the epoch lines only). Per-step metrics go to TensorBoard, and to the
console with --verbosity=1 (train.py)."""
import sys
import time
from typing import Optional


def duration(seconds: float) -> str:
  """1:05 for 65 s, 1:01:05 for 3665 s."""
  seconds = int(round(max(seconds, 0)))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f'{hours}:{minutes:02d}:{seconds:02d}' if hours else f'{minutes}:{seconds:02d}'


def eta_seconds(epoch: int, elapsed: float, remaining_epochs: int) -> float:
  """The time left if the remaining epochs take as long as the mean epoch so far."""
  return elapsed / max(epoch, 1) * remaining_epochs


def epoch_line(epoch: int, num_epochs: int, loss: float, val_map: float, test_map: float,
               scale: Optional[float], margin: Optional[float], images_per_second: float,
               elapsed: float, remaining_epochs: int) -> str:
  """'Epoch 3/10: loss 0.1234, val mAP 55.12, test mAP 54.30, s* 20.10, m* 0.2900, 410 img/s,
  0:45 elapsed, ETA 1:45' (s*, m* only for heads that have them; the ETA assumes the remaining
  epochs take as long as the mean epoch so far)."""
  parts = [f'loss {loss:.4f}', f'val mAP {val_map:.2f}', f'test mAP {test_map:.2f}']
  if scale is not None:
    parts += [f's* {scale:.2f}', f'm* {margin:.4f}']
  parts += [f'{images_per_second:.0f} img/s', f'{duration(elapsed)} elapsed']
  if remaining_epochs > 0:
    parts.append(f'ETA {duration(eta_seconds(epoch, elapsed, remaining_epochs))}')
  return f'Epoch {epoch}/{num_epochs}: ' + ', '.join(parts)


class ProgressBar:
  """A one-line bar of the steps of an epoch on stream (default stderr), redrawn at most every
  `interval` seconds, only when stream is a terminal and enabled (process 0)."""

  def __init__(self, stream=None, enabled: bool = True, interval: float = 0.25, width: int = 30):
    self.stream = stream if stream is not None else sys.stderr
    self.enabled = enabled and hasattr(self.stream, 'isatty') and self.stream.isatty()
    self.interval, self.width = interval, width
    self._last_draw, self._drawn = 0.0, False
    self.label, self.total, self._start = '', 1, time.time()

  def start(self, label: str, total_steps: int) -> None:
    self.label, self.total, self._start = label, max(total_steps, 1), time.time()
    self._last_draw = 0.0

  def update(self, done_steps: int, images_per_step: int) -> None:
    if not self.enabled:
      return
    now = time.time()
    if now - self._last_draw < self.interval and done_steps < self.total:
      return
    self._last_draw = now
    fraction = min(done_steps / self.total, 1.0)
    filled = int(round(fraction * self.width))
    elapsed = now - self._start
    rate = done_steps * images_per_step / elapsed if elapsed > 0 else 0.0
    eta = elapsed / done_steps * (self.total - done_steps) if done_steps else 0.0
    self.stream.write(f'\r{self.label} [{"#" * filled}{"." * (self.width - filled)}] '
                      f'{done_steps}/{self.total} steps, {rate:.0f} img/s, ETA {duration(eta)} ')
    self.stream.flush()
    self._drawn = True

  def clear(self) -> None:
    """Erases the bar, so that the epoch's line starts on a clean line."""
    if self.enabled and self._drawn:
      self.stream.write('\r\033[K')
      self.stream.flush()
      self._drawn = False
