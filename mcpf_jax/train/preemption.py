"""Stopping on SIGTERM / SIGINT or a host maintenance event: finish the step, save it, wait until the save is durable,
exit with a known status.

Cloud TPU VMs and spot GPUs are preempted with SIGTERM (then SIGKILL after a grace period). On GCE and Cloud TPU
VMs a host maintenance is also announced on the metadata server (`instance/maintenance-event`, about 60 s ahead),
not always with a signal: a daemon thread long-polls it (`MaintenanceWatcher`, on GCE only: GCE_METADATA_HOST set,
as Google's libraries read it, or the machine's DMI product name says Google). TERMINATE_ON_HOST_MAINTENANCE (the VM
is about to stop) is a stop request; MIGRATE_ON_HOST_MAINTENANCE (live migration: the VM keeps running) is logged,
training goes on. `StopRequest.poll()` is called once per training step and once per evaluation batch, on every
process in the same order:
- one process: a Python signal handler records the signal (the watcher, the event); poll() is True from the next
  call on;
- under jax.distributed: jax's preemption service (its SIGTERM notifier and `reached_preemption_sync_point`) makes
  every process see the request at the SAME poll, so all of them save the same step. SIGINT and a maintenance
  event are turned into a SIGTERM to this process so that they go through the same service (one host's event
  stops every host).
The program then exits with EXIT_STATUS[signal]: 143 for SIGTERM (128 + 15, what schedulers expect of a job that
stopped on SIGTERM) and for a maintenance event, 130 for SIGINT in one process; under jax.distributed always 143.
"""

from __future__ import annotations

import logging
import os
import pathlib
import signal
import threading
import time
import urllib.error
import urllib.request
from typing import ClassVar

from mcpf_jax.train import launch

log = logging.getLogger("mcpf_jax")

EXIT_STATUS = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 128 + signal.SIGINT}
MAINTENANCE_PATH = "/computeMetadata/v1/instance/maintenance-event"
NO_EVENT = "NONE"
LIVE_MIGRATION = "MIGRATE_ON_HOST_MAINTENANCE"  # the VM keeps running: not a reason to stop
LONG_POLL_S = 60  # the metadata server answers a long poll when the value changes or after this many seconds


class Stopped(Exception):
  """The run stopped on a signal or a maintenance event after saving what it had (`status`: the exit status)."""

  def __init__(self, message: str, status: int):
    super().__init__(message)
    self.status = status


def metadata_host() -> str | None:
  """The GCE metadata server's host[:port] when this runs on GCE (or GCE_METADATA_HOST names one), else None."""
  if os.environ.get("GCE_METADATA_HOST"):
    return os.environ["GCE_METADATA_HOST"]
  try:
    product = pathlib.Path("/sys/class/dmi/id/product_name").read_text().strip()
  except OSError:
    return None
  return "169.254.169.254" if product.startswith("Google") else None  # "Google Compute Engine": GCE, TPU VMs


class MaintenanceWatcher:
  """Long-polls `http://HOST/computeMetadata/v1/instance/maintenance-event` in a daemon thread.

  `value` is the last value read (None before the first answer); each change is passed to the subscribed callbacks
  and logged. One watcher per metadata host and process (`for_host`), shared by the successive StopRequests.
  """

  _by_host: ClassVar[dict[str, MaintenanceWatcher]] = {}
  _registry_lock = threading.Lock()

  def __init__(self, host: str):
    self._lock = threading.Lock()
    self.host = host
    self.url = f"http://{host}{MAINTENANCE_PATH}"
    self.value: str | None = None
    self._callbacks: list = []
    self._closed = False
    self._thread = threading.Thread(target=self._run, name="maintenance-event", daemon=True)

  @classmethod
  def for_host(cls, host: str) -> MaintenanceWatcher:
    with cls._registry_lock:
      if host not in cls._by_host:
        cls._by_host[host] = cls(host)
        cls._by_host[host]._thread.start()
      return cls._by_host[host]

  def subscribe(self, callback) -> None:
    """`callback(value)` on every change from now on, and at once with the current value if it is an event."""
    with self._lock:
      self._callbacks.append(callback)
      value = self.value
    if value not in (None, NO_EVENT):
      callback(value)

  def unsubscribe(self, callback) -> None:
    with self._lock:
      if callback in self._callbacks:
        self._callbacks.remove(callback)

  def close(self) -> None:
    """Stops watching (the thread ends after its current request); `for_host` then starts a new watcher."""
    with self._registry_lock:
      if self._by_host.get(self.host) is self:
        del self._by_host[self.host]
    self._closed = True

  def _get(self, etag: str) -> tuple[str, str]:
    """(value, etag): at once when the value's etag differs from `etag`, else when it changes (or the long poll
    times out)."""
    request = urllib.request.Request(f"{self.url}?wait_for_change=true&last_etag={etag}&timeout_sec={LONG_POLL_S}",
                                     headers={"Metadata-Flavor": "Google"})
    # Straight to the server, never through an HTTP proxy the environment names (as Google's libraries do).
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=LONG_POLL_S + 10) as response:
      return response.read().decode().strip(), response.headers.get("ETag", "0")

  def _run(self) -> None:
    etag, failures = "0", 0
    while not self._closed:
      try:
        value, etag = self._get(etag)
      except (OSError, urllib.error.URLError) as e:  # includes HTTPError (e.g. 503 during an update) and timeouts
        if self._closed:
          return
        failures += 1
        if failures == 1:
          log.warning("maintenance events: the metadata server at %s did not answer (%s); trying again", self.url,
                      e)
        time.sleep(min(30.0, 0.5 * 2 ** min(failures, 6)))
        continue
      failures = 0
      if self._closed:
        return
      with self._lock:
        changed, self.value = value != self.value, value
        callbacks = list(self._callbacks)
      if not changed:
        continue
      if value == LIVE_MIGRATION:
        log.warning("maintenance event %s from %s: the VM is live-migrated and keeps running; training goes on",
                    value, self.host)
      elif value != NO_EVENT:
        log.warning("maintenance event %s from %s: finishing the current step, then saving and stopping", value,
                    self.host)
      for callback in callbacks:
        callback(value)


class StopRequest:
  """Signals and maintenance events become a stop request that every process sees at the same `poll()`."""

  def __init__(self):
    self.signum: int | None = None
    self.event: str | None = None  # the maintenance event that asked this process to stop
    self.distributed = launch.is_distributed()
    self._count = 0
    self._previous = {}
    self._stopped = False
    self._watcher: MaintenanceWatcher | None = None

  def install(self) -> StopRequest:
    if self.distributed:
      # jax's preemption notifier owns SIGTERM; route Ctrl-C through it too.
      self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._forward)
    else:
      for s in (signal.SIGTERM, signal.SIGINT):
        self._previous[s] = signal.signal(s, self._record)
    host = metadata_host()
    if host is not None:
      self._watcher = MaintenanceWatcher.for_host(host)
      self._watcher.subscribe(self._maintenance)
    return self

  def uninstall(self) -> None:
    if self._watcher is not None:
      self._watcher.unsubscribe(self._maintenance)
      self._watcher = None
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

  def _maintenance(self, value: str) -> None:
    """From the watcher's thread: an event other than a live migration is a stop request."""
    if value in (NO_EVENT, LIVE_MIGRATION) or self.event is not None:
      return
    self.event = value
    if self.distributed:
      os.kill(os.getpid(), signal.SIGTERM)  # jax's preemption service: every process stops at the same step

  @property
  def reason(self) -> str:
    """Why the run stopped, for the exit message: 'on a signal' or 'for the maintenance event X'."""
    return f"for the maintenance event {self.event}" if self.event is not None else "on a signal"

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
      self._stopped = self.signum is not None or self.event is not None
    return self._stopped

  @property
  def status(self) -> int:
    if self.distributed or self.signum is None:
      return EXIT_STATUS[signal.SIGTERM]
    return EXIT_STATUS.get(self.signum, EXIT_STATUS[signal.SIGTERM])
