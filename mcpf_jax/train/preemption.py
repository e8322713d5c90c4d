"""Stopping on SIGTERM / SIGINT: finish the step, save it, wait until the save is durable, exit with a known status.

Cloud TPU VMs and spot GPUs are preempted with SIGTERM (then SIGKILL after a grace period). `StopRequest.poll()` is
called once per training step and once per evaluation batch, on every process in the same order:
- one process: a Python signal handler records the signal; poll() is True from the next call on;
- under jax.distributed: jax's preemption service (its SIGTERM notifier and `reached_preemption_sync_point`) makes
  every process see the request at the SAME poll, so all of them save the same step. SIGINT is turned into a
  SIGTERM to this process so that it goes through the same service.
The program then exits with EXIT_STATUS[signal]: 143 for SIGTERM (128 + 15, what schedulers expect of a job that
stopped on SIGTERM), 130 for SIGINT in one process; under jax.distributed always 143.
"""

from __future__ import annotations

import logging
import os
import signal

from mcpf_jax.train import launch

log = logging.getLogger("mcpf_jax")

EXIT_STATUS = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 128 + signal.SIGINT}


class Stopped(Exception):
  """The run stopped on a signal after saving what it had (`status` is the exit status to use)."""

  def __init__(self, message: str, status: int):
    super().__init__(message)
    self.status = status


class StopRequest:
  """Signals become a stop request that every process sees at the same `poll()`."""

  def __init__(self):
    self.signum: int | None = None
    self.distributed = launch.is_distributed()
    self._count = 0
    self._previous = {}
    self._stopped = False

  def install(self) -> StopRequest:
    if self.distributed:
      # jax's preemption notifier owns SIGTERM; route Ctrl-C through it too.
      self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._forward)
    else:
      for s in (signal.SIGTERM, signal.SIGINT):
        self._previous[s] = signal.signal(s, self._record)
    return self

  def uninstall(self) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()

  def __enter__(self) -> StopRequest:
    return self.install()

  def __exit__(self, *exc) -> None:
    self.uninstall()

  def _record(self, signum, frame) -> None:
    del frame
    if self.signum is None:
      log.warning("received %s: finishing the current step, then saving and stopping", signal.Signals(signum).name)
    self.signum = signum

  def _forward(self, signum, frame) -> None:
    del frame
    self.signum = signum
    os.kill(os.getpid(), signal.SIGTERM)

  def poll(self) -> bool:
    """True once a stop was requested (on every process at the same call under jax.distributed). Cheap."""
    if self._stopped:
      return True
    self._count += 1
    if self.distributed:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      self._stopped = bool(multihost_utils.reached_preemption_sync_point(self._count))
    else:
      self._stopped = self.signum is not None
    return self._stopped

  @property
  def status(self) -> int:
    if self.distributed or self.signum is None:
      return EXIT_STATUS[signal.SIGTERM]
    return EXIT_STATUS.get(self.signum, EXIT_STATUS[signal.SIGTERM])
