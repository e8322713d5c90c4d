"""Hosts that may not share a disk: what process 0 reads reaches the others through the coordinator, and which
folders the processes really share is checked, not assumed.

A multi-host job's processes agree on nothing they did not exchange. Three rules follow:
- The run folder (and a checkpoint_dir apart from it) must be one folder for every process: orbax's multi-host
  save has every process write its shards there and process 0 commit the step. `check_shared` refuses a start
  whose processes do not all see it (each writes a marker, each looks for the others') before anything of the run
  is written; a bucket URL must be the same string on every process.
- Files of the run that process 0 reads (run.json, split.json) reach the others by `from_process_0` (a broadcast
  through the coordinator), never by a read of a disk that may not hold them.
- A local dataset folder may be each host's own: `leaders` says, for a folder, which processes see the same one,
  so one process per distinct copy builds it (data_setup), and `check_same` refuses a job whose processes read
  datasets with different identities.
Every function is collective (all processes call it, in the same order) and a no-op in a one-process job.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from mcpf_jax import rundir

MARKER = ".mcpf-host-{nonce}-{process}"
# How long a process keeps looking for the others' markers before it concludes it does not share the folder: a
# network file system may show another client's new file only after its attribute cache expires.
VISIBLE_WITHIN_S = 6.0


class HostsError(ValueError):
  """The processes of a job do not share what they must (a run folder), or read different data; raised before the
  run writes anything."""


def _multi() -> bool:
  return jax.process_count() > 1


def _broadcast_bytes(raw: bytes | None) -> bytes:
  """Process 0's `raw` on every process (the others pass None)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  mine = np.frombuffer(raw or b"", np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.asarray(mine.size, np.int64)))
  buf = mine if jax.process_index() == 0 else np.zeros((size,), np.uint8)
  return bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf), np.uint8).tobytes()) if size else b""


def broadcast_json(value: Any = None) -> Any:
  """Process 0's `value` (JSON-serialisable) on every process; the others' `value` is ignored."""
  if not _multi():
    return value
  raw = json.dumps(value).encode("utf-8") if jax.process_index() == 0 else None
  return json.loads(_broadcast_bytes(raw))


def allgather_json(value: Any) -> list[Any]:
  """Every process's `value` (JSON-serialisable), in process order, on every process."""
  if not _multi():
    return [value]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  raw = np.frombuffer(json.dumps(value).encode("utf-8"), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([raw.size], np.int64))).reshape(-1)
  padded = np.zeros((int(sizes.max()),), np.uint8)
  padded[:raw.size] = raw
  table = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [json.loads(table[i, :int(n)].tobytes()) for i, n in enumerate(sizes)]


def from_process_0(fn: Callable[[], Any], errors: Sequence[type[Exception]] = (ValueError, FileNotFoundError)
                   ) -> Any:
  """`fn()` run by process 0 alone, its JSON-serialisable result on every process. An exception of one of
  `errors` raised there is raised on every process (same type and message), so no process waits for a result
  that never comes."""
  if not _multi():
    return fn()
  out = None
  if jax.process_index() == 0:
    try:
      out = {"value": fn()}
    except tuple(errors) as e:
      out = {"error": type(e).__name__, "message": str(e)}
      mine = e
  out = broadcast_json(out)
  if "error" in out:
    if jax.process_index() == 0:
      raise mine
    kind = next((t for t in errors if t.__name__ == out["error"]), ValueError)
    raise kind(out["message"])
  return out["value"]


def _remote_url(folder: epath.Path) -> str | None:
  return os.fspath(folder) if rundir.is_remote(folder) else None


def leaders(folder: os.PathLike[str], what: str) -> list[int]:
  """For each process, the lowest-numbered process that sees the same `folder` (created if missing): each process
  writes a marker there and looks for the others'. A local folder on one disk gives [0, 0, ...]; on each host's
  own disk [0, 1, ...] (one process per host), or one leader per host for several processes per host.

  `what` names the folder in no message; it keeps the barrier names readable (no path in them: each host may mount
  the folder elsewhere)."""
  n, me = jax.process_count(), jax.process_index()
  if n == 1:
    return [0]
  folder = rundir.path(folder)
  url = _remote_url(folder)
  if url is not None:  # one bucket URL is one folder for every process: the same string everywhere
    urls = allgather_json(url)
    return [urls.index(u) for u in urls]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  nonce = broadcast_json(secrets.token_hex(8) if me == 0 else None)
  folder.mkdir(parents=True, exist_ok=True)
  mine = folder / MARKER.format(nonce=nonce, process=me)
  mine.write_text(f"{me}\n")
  multihost_utils.sync_global_devices(f"host markers written: {what}")
  names = [MARKER.format(nonce=nonce, process=i) for i in range(n)]
  deadline = time.monotonic() + VISIBLE_WITHIN_S
  while True:
    present = set(os.listdir(os.fspath(folder)))  # reading the folder revalidates an NFS client's cache of it
    seen = [name in present for name in names]
    if all(seen) or time.monotonic() > deadline:
      break
    time.sleep(0.5)
  table = allgather_json(seen)
  multihost_utils.sync_global_devices(f"host markers read: {what}")
  mine.unlink()
  return [min(j for j in range(n) if table[i][j] or i == j) for i in range(n)]


def check_shared(folder: os.PathLike[str], what: str, fix: str) -> None:
  """Refuses (HostsError, on every process) a `folder` that is not one folder for all processes; a folder the check
  had to create is removed again, so a refused start leaves nothing behind. `what`: the folder's role in the
  message ("the run folder (--workdir)"); `fix`: what to do."""
  if not _multi():
    return
  folder = rundir.path(folder)
  created = _remote_url(folder) is None and not folder.exists()
  group = leaders(folder, what)
  if all(g == 0 for g in group):
    return
  if created:
    try:
      folder.rmdir()
    except (OSError, ValueError):  # not empty after all (epath says so with a ValueError)
      pass
  apart = [i for i, g in enumerate(group) if g != 0]
  raise HostsError(f"{folder}: {what} is not one folder for all {len(group)} processes: process(es) "
                   f"{', '.join(map(str, apart))} do not see what process 0 writes there (each host has its own "
                   f"disk at that path, or a different path was given); nothing was written. {fix}")


def check_same(record: Mapping[str, Any], keys: Sequence[str], what: str) -> None:
  """Refuses (HostsError, on every process) a job whose processes hold different `record`s (compared on `keys`):
  e.g. each host's own copy of a dataset, which must be the same build. The message names the processes, the
  differing fields and both values."""
  if not _multi():
    return
  mine = {k: record.get(k) for k in keys}
  digest = hashlib.sha256(json.dumps(mine, sort_keys=True, default=str).encode()).hexdigest()
  everyone = allgather_json({"digest": digest, "record": mine, "where": record.get("path")})
  first = everyone[0]
  bad = [i for i, r in enumerate(everyone) if r["digest"] != first["digest"]]
  if not bad:
    return
  i = bad[0]
  a, b = first["record"], everyone[i]["record"]
  diff = "; ".join(f"{k}: process 0 {json.dumps(a[k])}, process {i} {json.dumps(b[k])}" for k in keys if a[k] != b[k])
  raise HostsError(f"{what} differs between the processes: process(es) {', '.join(map(str, bad))} read another "
                   f"one than process 0 ({first['where']} on process 0, {everyone[i]['where']} on process {i}): "
                   f"{diff}. Every host must read the same build (copy process 0's folder to the others, or point "
                   "data.data_dir at one folder or bucket every host reads); the run was not started")


FIX = ("Give every process the same folder: a shared file system mounted on every host, or a bucket "
       "(--workdir gs://bucket/run)")


def check_run_folder(workdir: os.PathLike[str]) -> None:
  """`check_shared` for a run folder (train.py, eval.py)."""
  check_shared(workdir, "the run folder (--workdir)", FIX)


def check_checkpoint_folder(workdir: os.PathLike[str], checkpoint_dir: os.PathLike[str], *,
                            existing_only: bool = False) -> None:
  """`check_shared` for a run's checkpoint folder when it is apart from the run folder (inside it, the run folder's
  check covers it). existing_only: only where process 0 finds it (a reader never creates it)."""
  if not _multi() or str(checkpoint_dir).startswith(str(rundir.absolute(workdir)).rstrip("/") + "/"):
    return
  if existing_only and not from_process_0(lambda: rundir.is_remote(checkpoint_dir)
                                          or rundir.path(checkpoint_dir).is_dir()):
    return
  check_shared(checkpoint_dir, "the checkpoint folder (checkpoint_dir)", FIX)
