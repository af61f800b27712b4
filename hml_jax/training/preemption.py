"""Stopping cleanly on SIGTERM (Cloud TPU's preemption notice) and Ctrl-C.

The training loop asks `should_stop(step)` after every step. The first SIGTERM or SIGINT only
raises a flag, so that the step in flight finishes and a checkpoint of it is written; a second
Ctrl-C interrupts at once. With several processes, JAX's preemption sync point makes every
process stop after the same step (the coordination service relays the notice).
"""
import signal
import threading

import jax


class Preempted(Exception):
  """Raised after the checkpoint of the step that was running when the signal came."""

  def __init__(self, step: int, signal_name: str):
    super().__init__(f'{signal_name}: saved a checkpoint at step {step}; run the same command '
                     'again to resume from it.')
    self.step, self.signal_name = step, signal_name


class Guard:
  """Context manager: installs the handlers (main thread only) and restores the old ones."""

  def __init__(self):
    self.signal_name = None
    self._previous = {}

  def _handle(self, signum, frame):
    if self.signal_name is not None and signum == signal.SIGINT:
      previous = self._previous.get(signal.SIGINT)
      if callable(previous):
        previous(signum, frame)
      raise KeyboardInterrupt
    self.signal_name = signal.Signals(signum).name

  def __enter__(self):
    # With several processes JAX's own preemption notifier handles SIGTERM (should_stop asks it),
    # so only Ctrl-C is ours there.
    signals = (signal.SIGINT,) if jax.process_count() > 1 else (signal.SIGTERM, signal.SIGINT)
    if threading.current_thread() is threading.main_thread():
      for signum in signals:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    return False

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      if multihost_utils.reached_preemption_sync_point(step):
        self.signal_name = self.signal_name or 'SIGTERM'
        return True
      return False
    return self.signal_name is not None
