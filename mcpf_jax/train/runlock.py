"""One writer per run: train.py holds <workdir>/train.lock while it runs (process 0 of a multi-process job).

The lock is a small JSON file {"host", "pid", "since"} created atomically: `O_CREAT | O_EXCL` on a local (or NFS)
folder, an upload with the precondition if_generation_match=0 (create only if absent) in a gs:// bucket. A second
start finds it and is refused (`RunLockedError`, naming the holder) before it changes anything. A lock whose holder
is gone (same host, no such process) is taken over with a log line; any other (another host, e.g. a crashed VM)
only with --force_unlock. It is removed on every way out of train.py (the end, a preemption's save-and-exit, an
error); SIGKILL leaves it, which the next start on the same host takes over. Readers (eval, score, export) take
no lock.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

from mcpf_jax import rundir

LOCK_FILE = "train.lock"
log = logging.getLogger("mcpf_jax")


class RunLockedError(RuntimeError):
  """Another train.py holds the run's lock."""


def _record() -> dict[str, Any]:
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # a process of another user
    return True
  return True


def _describe(holder: dict[str, Any] | None) -> str:
  if not holder:
    return "an unreadable lock"
  return f"host {holder.get('host')} pid {holder.get('pid')} since {holder.get('since')}"


class _Local:
  def __init__(self, path: str):
    self.path = path

  def create(self, data: bytes) -> bool:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    return True

  def read(self) -> dict[str, Any] | None:
    try:
      with open(self.path, "rb") as f:
        return json.loads(f.read())
    except FileNotFoundError:
      return None
    except ValueError:
      return {}

  def remove_if(self, holder: dict[str, Any] | None) -> None:
    """Removes the lock if it still holds `holder` (renamed first: of two processes taking over, one wins)."""
    aside = f"{self.path}.taken-{os.getpid()}"
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return
    with open(aside, "rb") as f:
      raw = f.read()
    try:
      now = json.loads(raw)
    except ValueError:
      now = {}
    if holder is None or now == holder:
      os.unlink(aside)
    else:  # someone else's fresh lock: put it back
      os.rename(aside, self.path)


class _Bucket:
  def __init__(self, url: str):
    from google.cloud import storage  # pylint: disable=g-import-not-at-top
    bucket, name = url.split("://", 1)[1].split("/", 1)
    if os.environ.get("STORAGE_EMULATOR_HOST"):
      client = storage.Client.create_anonymous_client()
    else:
      client = storage.Client()
    self.blob = client.bucket(bucket).blob(name)

  def create(self, data: bytes) -> bool:
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    try:
      self.blob.upload_from_string(data, content_type="application/json", if_generation_match=0)
    except exceptions.PreconditionFailed:
      return False
    return True

  def read(self) -> dict[str, Any] | None:
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    try:
      return json.loads(self.blob.download_as_bytes())
    except exceptions.NotFound:
      return None
    except ValueError:
      return {}

  def remove_if(self, holder: dict[str, Any] | None) -> None:
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    try:
      self.blob.reload()
      generation = self.blob.generation
      if holder is not None and json.loads(self.blob.download_as_bytes(if_generation_match=generation)) != holder:
        return
      self.blob.delete(if_generation_match=generation)
    except (exceptions.NotFound, exceptions.PreconditionFailed):
      return


def _store(workdir: rundir.PathLike):
  path = rundir.path(workdir) / LOCK_FILE
  if rundir.is_remote(path):
    return _Bucket(os.fspath(path))
  path.parent.mkdir(parents=True, exist_ok=True)
  return _Local(os.fspath(path))


def acquire(workdir: rundir.PathLike, *, force: bool = False) -> dict[str, Any]:
  """Creates the run's lock; returns what it holds.

  Raises:
    RunLockedError: another train.py holds it (named: host, pid, since when), and it is not stale.
  """
  store = _store(workdir)
  mine = _record()
  data = json.dumps(mine).encode()
  where = rundir.path(workdir) / LOCK_FILE
  for _ in range(3):
    if store.create(data):
      return mine
    holder = store.read()
    if holder is None:  # released meanwhile
      continue
    stale = (holder.get("host") == mine["host"] and isinstance(holder.get("pid"), int)
             and not _alive(holder["pid"]))
    if not (stale or force):
      raise RunLockedError(
          f"{rundir.path(workdir)}: another train.py is writing this run ({_describe(holder)}; lock file {where}). "
          "Nothing was changed. Wait for it to end; if it is gone (e.g. its machine crashed), start again with "
          "--force_unlock")
    log.warning("taking over the lock %s of %s (%s)", where, _describe(holder),
                "that process is gone" if stale else "--force_unlock")
    store.remove_if(holder)
  raise RunLockedError(f"{where}: could not take the run's lock (another start keeps taking it)")


def release(workdir: rundir.PathLike, held: dict[str, Any]) -> None:
  """Removes the run's lock if it is still the one `held` (acquire's return)."""
  _store(workdir).remove_if(held)


@contextlib.contextmanager
def hold(workdir: rundir.PathLike, *, force: bool = False, enabled: bool = True) -> Iterator[None]:
  """The run's lock for the duration of the block (`enabled`: process 0 of a job), released on every way out."""
  if not enabled:
    yield
    return
  folder = rundir.path(workdir)
  created = not rundir.is_remote(folder) and not folder.exists()
  held = acquire(workdir, force=force)
  try:
    yield
  finally:
    release(workdir, held)
    if created and folder.is_dir() and not any(folder.iterdir()):  # a start refused before the run wrote anything
      folder.rmdir()  # leaves no empty run folder behind
