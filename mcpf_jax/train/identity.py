"""A run's identity: its resolved config, the dataset it read and the split it trained on, checked on every start.

`train.py` writes, once and atomically, before its first step (process 0 only):
  <workdir>/run.json    {"config": the resolved config, "dataset": identity of the prepared dataset (name, builder
                         version, path, number of records, fingerprint of names + MOS + content ids),
                         "split": the protocol, seed and fractions, "init_from": where step 0's weights came from}
  <workdir>/split.json  {"protocol", "split_seed", ..., "train"/"val"/"test": the image names of each side}
A restart compares the new config with run.json field by field (`compare`): a field that changes what is computed
(`COMPUTE`: everything but the fields below) stops the start before anything in the workdir is touched, and the
error lists every differing field with its saved and its new value. The fields in `OBSERVE` only change how a run is
observed or stored, or where it runs, and may change freely. `IDENTITY_BY_FINGERPRINT` fields (where the backbone
and the dataset are read from) may change as long as what they point at has the same fingerprint, which is checked
separately. A dataset rebuilt with other rows (another fingerprint) is refused the same way, at resume and at eval.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from mcpf_jax import rundir, runs

RUN_FILE = rundir.RUN_FILE
SPLIT_FILE = rundir.SPLIT_FILE
FORMAT = 1

# Fields that may differ between the start of a run and a restart (how a run is observed, stored, or where it
# runs). Each is also listed in the README. A prefix ending in "." covers a whole block.
OBSERVE = (
    "train.log_every",  # log / TensorBoard cadence
    "train.checkpoint_every",  # checkpoint cadence
    "train.checkpoint_minutes",  # time-based checkpoint cadence
    "train.keep",  # checkpoint retention
    "checkpoint_dir",  # where the checkpoints are stored (moved with the run)
    "eval.batch_size",  # images per eval batch: padding rows carry weight 0, the scores do not depend on it
    "eval.checkpoint",  # which checkpoint eval.py restores
    "eval.dataset",  # cross-dataset evaluation target of eval.py
    "mesh.",  # where the work runs (devices per axis, backbone sharding), not what is computed
    "clip.remat",  # recompute activations in the backward pass: memory for compute, same numbers
    "clip.scan_layers",  # the blocks as a lax.scan: compile time and memory, same weights and numbers
    "clip.image_chunk",  # images per vision-tower pass: speed only
    "data.num_workers",  # decoding processes: the input stream is a function of the step alone
    "data.prefetch_to_device",  # batches sent to the devices ahead of the step: same batches, same order
    "num_splits",  # the protocol's number of splits (each split's own run has num_splits=1)
)
# Where the backbone and the dataset are read from (and the plugins that register generated ones): may move, their
# fingerprints are checked instead.
IDENTITY_BY_FINGERPRINT = ("clip.name", "clip.revision", "data.data_dir", "data.manual_dir", "plugins")
# The fields eval.py takes from the command line; everything else comes from the run it evaluates.
EVAL_FIELDS = ("eval.",)


class RunMismatchError(ValueError):
  """A start or an evaluation refused because the run's identity (config, dataset, split) differs."""


def _matches(key: str, patterns: Iterable[str]) -> bool:
  return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def is_free(key: str) -> bool:
  """True for a config field that may change on restart (OBSERVE or IDENTITY_BY_FINGERPRINT)."""
  return _matches(key, OBSERVE) or _matches(key, IDENTITY_BY_FINGERPRINT)


def is_eval_field(key: str) -> bool:
  return _matches(key, EVAL_FIELDS)


def config_dict(config: Any) -> dict[str, Any]:
  """The config as plain JSON data (references resolved; tuples become lists, as in the saved files)."""
  if isinstance(config, Mapping) and not hasattr(config, "to_json_best_effort"):
    return json.loads(json.dumps(config))
  return json.loads(config.to_json_best_effort())


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1}. An empty block stays as one field holding {}."""
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping) and v:
      out.update(flatten(v, key + "."))
    else:
      out[key] = v
  return out


_MISSING = "<absent>"


def differences(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
  """[(field, saved value, new value)] for every field that differs (absent on one side shows as "<absent>")."""
  a, b = flatten(config_dict(saved)), flatten(config_dict(new))
  out = []
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k, _MISSING), b.get(k, _MISSING)
    if va != vb:
      out.append((k, va, vb))
  return out


def compare(saved: Mapping[str, Any], new: Any, where: str | os.PathLike[str]) -> list[tuple[str, Any, Any]]:
  """Refuses a restart whose config differs from the saved one in a field that changes what is computed.

  Returns:
    The differences in free fields (OBSERVE / IDENTITY_BY_FINGERPRINT), to be logged.

  Raises:
    RunMismatchError: listing every differing COMPUTE field with its saved and its new value, and what to do.
  """
  diffs = differences(saved, new)
  refused = [d for d in diffs if not is_free(d[0])]
  if refused:
    lines = "\n".join(f"  {k}: saved {json.dumps(a)}, now {json.dumps(b)}" for k, a, b in refused)
    raise RunMismatchError(
        f"{where}: this workdir holds a run started with another config; {len(refused)} field(s) that change what "
        f"is computed differ:\n{lines}\nNothing was changed. Use a new --workdir for the new config, or start a new "
        f"run from this one's trained weights with --config.init_from={rundir.path(where)}")
  return [d for d in diffs if is_free(d[0])]


def check_checkpoint_config(stored: Mapping[str, Any], config: Any, where: str | os.PathLike[str],
                            run_file: str | os.PathLike[str]) -> None:
  """The config saved inside checkpoint `where` must agree with the run's config (`config`, from run.json) in every
  field that changes what is computed: a hand-edited run.json (with the matching --config) is refused, naming each
  field with both values. Fields the checkpoint does not record (written by an older version) are not compared.

  Raises:
    RunMismatchError: naming each differing field, its value in the checkpoint and in run.json.
  """
  stored = runs.upgrade_config(config_dict(stored))
  refused = [(k, a, b) for k, a, b in differences(stored, config) if not is_free(k) and a != _MISSING]
  if refused:
    lines = "\n".join(f"  {k}: checkpoint {json.dumps(a)}, {rundir.path(run_file).name} {json.dumps(b)}"
                      for k, a, b in refused)
    raise RunMismatchError(
        f"{where}: the config saved with this checkpoint differs from {run_file} in {len(refused)} field(s) that "
        f"change what is computed (was {rundir.path(run_file).name} edited?):\n{lines}\nNothing was changed. Restore "
        f"{run_file} to the checkpoint's values, or start a new run from it (new --workdir, "
        f"--config.init_from={rundir.path(run_file).parent})")


# ---------------------------------------------------------------------------------------------------------------
# The dataset and the split.


def dataset_identity(source: Any, name: str) -> dict[str, Any]:
  """What identifies a prepared dataset: name, builder version, records, and a fingerprint of its rows.

  The fingerprint is the sha256 of the record count, each record's name, MOS (float32 bytes) and content id, in
  record order: a dataset rebuilt with other rows, other scores or another order has another fingerprint.
  """
  h = hashlib.sha256()
  names = [str(n) for n in np.asarray(source.names, dtype=object).tolist()]
  contents = [str(c) for c in np.asarray(source.content_ids, dtype=object).tolist()]
  h.update(f"{len(names)}\n".encode())
  for n, c in zip(names, contents):
    h.update(n.encode("utf-8") + b"\0" + c.encode("utf-8") + b"\n")
  h.update(np.ascontiguousarray(np.asarray(source.mos, np.float32)).tobytes())
  path = rundir.path(getattr(source, "path", ""))
  stored = (getattr(source, "metadata", None) or {}).get("resize")
  return {"name": name, "version": path.name if path.name else None, "path": str(path), "num_records": len(names),
          "fingerprint": h.hexdigest(), "stored_short_side": stored}


def check_dataset(saved: Mapping[str, Any], current: Mapping[str, Any], where: str | os.PathLike[str]) -> None:
  """The dataset read now must be the one the run started on (same name, version and fingerprint)."""
  keys = ("name", "version", "num_records", "fingerprint", "stored_short_side")
  diff = [(k, saved.get(k), current.get(k)) for k in keys if saved.get(k) != current.get(k)]
  if diff:
    lines = "\n".join(f"  {k}: saved {json.dumps(a)}, now {json.dumps(b)}" for k, a, b in diff)
    raise RunMismatchError(
        f"{where}: the dataset at {current.get('path')} is not the one this run started on (saved from "
        f"{saved.get('path')}); it was rebuilt or replaced:\n{lines}\nNothing was changed. Point data.data_dir at "
        "the original build, or train a new run (new --workdir) on this one.")


def check_saved_dataset(saved: tuple[Mapping[str, Any], Any] | None, data: Any, workdir: str | os.PathLike[str]
                        ) -> dict[str, Any]:
  """The identity of `data` (a RunData) now, checked against the run's saved one (`saved`: (run.json, split.json)
  as `read` gives them; a run of an older version without them, or without a dataset record, is not checked).
  Training (at a restart) and evaluation both check here."""
  current = dataset_identity(data.source, data.name)
  if saved is not None and "dataset" in saved[0]:
    check_dataset(saved[0]["dataset"], current, workdir)
  return current


def split_record(config: Any, names: np.ndarray, indices: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """split.json: the protocol and seed, and the image names on each side."""
  out = {"format": FORMAT, "protocol": config.data.split_protocol, "split_seed": int(config.data.split_seed),
         "train_fraction": float(config.data.train_fraction), "val_fraction": float(config.data.val_fraction)}
  for side in ("train", "val", "test"):
    out[side] = [str(names[i]) for i in np.asarray(indices[side]).tolist()]
  return out


def indices_from_split(record: Mapping[str, Any], names: np.ndarray, where: str | os.PathLike[str]
                       ) -> dict[str, np.ndarray]:
  """The record positions of split.json's names in a source (every name must be there exactly once)."""
  pos: dict[str, int] = {}
  for i, n in enumerate(np.asarray(names, dtype=object).tolist()):
    pos.setdefault(str(n), i)
  out = {}
  for side in ("train", "val", "test"):
    missing = [n for n in record[side] if n not in pos]
    if missing:
      raise RunMismatchError(f"{where}: {len(missing)} {side} image(s) of this run are not in the dataset (first: "
                             f"{missing[0]!r}); the dataset is not the one the run was trained on")
    out[side] = np.asarray([pos[n] for n in record[side]], np.int64)
  return out


# ---------------------------------------------------------------------------------------------------------------
# The files.


def write_json_atomic(path: str | os.PathLike[str], value: Any) -> None:
  """Writes `path` (local or gs://) whole or not at all (`rundir.write_atomic`)."""
  rundir.write_json_atomic(path, value, indent=1)


def read(workdir: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]] | None:
  """(run.json, split.json) of a workdir, or None when the run has none (not started, or an older version)."""
  workdir = rundir.path(workdir)
  try:
    run = runs.read_run(workdir)
  except ValueError as e:  # damaged run.json: the same message, as this module's error
    raise RunMismatchError(str(e)) from e
  if run is None:
    return None
  try:
    split = rundir.read_json(workdir / SPLIT_FILE)
  except ValueError as e:
    raise RunMismatchError(str(e)) from e
  return run, split


def write(workdir: str | os.PathLike[str], run: Mapping[str, Any], split: Mapping[str, Any]) -> None:
  """split.json, then run.json (its presence marks a complete identity), each atomically."""
  workdir = rundir.path(workdir)
  write_json_atomic(workdir / SPLIT_FILE, split)
  write_json_atomic(workdir / RUN_FILE, run)
