"""Orbax checkpoints of a run: the trainable parameters and the optimizer state as SEPARATE items, so inference
restores the parameters alone (`mcpf_jax.runs.read_params`) without building an optimizer.

Layout (`mcpf_jax.runs` describes it): <checkpoint_dir>/<step>/{params, opt, meta} (checkpoint_dir: a local folder
or gs://, by default <workdir>/checkpoints: `mcpf_jax.rundir.checkpoint_dir`) (and optionally `data`,
a grain iterator's state; the trainer needs none: its input stream is a function of the step). The frozen CLIP
backbone is never copied into a checkpoint: `meta` names it (source + fingerprint) and `check_backbone` refuses
to resume on other weights. Kept: the last `keep` checkpoints and the best one by validation SRCC.

Checkpoints of layout 1 (one `state` item with params, opt and step, before they were saved apart) are still
restored, for a resumed run as for inference.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from mcpf_jax import rundir, runs
from mcpf_jax.train import mesh as mesh_lib
from mcpf_jax.train import optim

log = logging.getLogger("mcpf_jax")


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class CheckpointSaveError(OSError):
  """A checkpoint save that failed (no space, no permission, an object-store error), in one line."""


class Checkpoints(runs.ReadOnlyCheckpoints):
  """A thin wrapper over `ocp.CheckpointManager` with this project's items (the step queries are the read-only
  view's, `runs.ReadOnlyCheckpoints`)."""

  def __init__(self, directory: str | os.PathLike[str], keep: int = 3, *, read_only: bool = False):
    self.directory = rundir.absolute(directory)
    # A read-only manager: without orbax's notice that it is read-only (what was asked for), as runs' reader.
    with runs.quiet_read_only() if read_only else contextlib.nullcontext():
      self.manager = ocp.CheckpointManager(self.directory, options=runs.manager_options(keep, read_only=read_only))
    self._in_flight: int | None = None  # the last step handed to the (asynchronous) save

  def save(self, step: int, state: dict[str, Any], mask: Any, iterator: Any | None, meta: dict[str, Any],
           metrics: dict[str, float] | None = None) -> None:
    trainable, _ = optim.partition(state["params"], mask)
    items = {
        runs.PARAMS: ocp.args.StandardSave(traverse_util.unflatten_dict(trainable, sep="/")),
        runs.OPT: ocp.args.StandardSave({"opt": state["opt"], "step": state["step"]}),
        runs.META: ocp.args.JsonSave(dict(meta, layout=runs.LAYOUT)),
    }
    if iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(iterator)
    try:
      self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(step, e) from e
    self._in_flight = step

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      # What fails here is the save still in flight, whether or not the error names its temporary folder.
      raise self._save_failed(self._in_flight, e) from e

  def _save_failed(self, step: int | None, error: Exception) -> CheckpointSaveError:
    """A failed save as one line: what failed (the step), where, why (the innermost error) and the last step on
    disk; the traceback goes to the log at debug level."""
    log.debug("saving a checkpoint to %s failed", self.directory, exc_info=error)
    cause = error
    while cause.__cause__ is not None or cause.__context__ is not None:
      cause = cause.__cause__ or cause.__context__
    try:
      on_disk = sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())
    except Exception:  # pylint: disable=broad-except
      on_disk = []
    # An async save fails at the next save or wait: the step that failed is the one in the temporary folder named.
    failed = re.search(r"[/\\](\d+)\.orbax-checkpoint-tmp", str(cause)) or re.search(
        r"[/\\](\d+)\.orbax-checkpoint-tmp", str(error))
    step = int(failed.group(1)) if failed else step
    what = f"saving checkpoint step {step}" if step is not None else "saving a checkpoint"
    last = f"the last good step is {on_disk[-1]}" if on_disk else "no step was saved yet"
    why = runs.one_line(cause) if cause is error else f"{runs.one_line(cause)} ({runs.one_line(error)})"
    return CheckpointSaveError(f"{what} to {self.directory} failed: {why}; {last} (free space or fix the "
                               "permissions, then run the same command again to resume from it)")

  def restore_meta(self, step: int) -> dict[str, Any]:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def _layout(self, step: int) -> int:
    return runs.layout(self.directory / str(step))

  def restore_params(self, step: int, params: Any, mask: Any, shardings: Any | None = None) -> Any:
    """`params` with its trainable leaves from checkpoint `step` (placed like `shardings`, default: like the
    leaves of `params`); frozen leaves kept. The optimizer state is not read (layout 2)."""
    trainable, frozen = optim.partition(params, mask)
    if shardings is None:
      sh = {k: getattr(v, "sharding", None) for k, v in trainable.items()}
    else:
      sh, _ = optim.partition(shardings, mask)
    target = _abstract(traverse_util.unflatten_dict(trainable, sep="/"), traverse_util.unflatten_dict(sh, sep="/"))
    if self._layout(step) == runs.LAYOUT:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          **{runs.PARAMS: ocp.args.StandardRestore(target)}))[runs.PARAMS]
    else:  # layout 1: the parameters are a subtree of "state"; restore it from its own metadata, keep "params"
      step_dir = self.directory / str(step)
      with ocp.StandardCheckpointer() as ck:
        tree = ck.metadata(step_dir / runs.OLD_STATE).item_metadata.tree
        rep = jax.sharding.NamedSharding(jax.sharding.Mesh(jax.devices(), ("all",)), jax.sharding.PartitionSpec())
        whole = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=rep), tree)
        whole["params"] = target
        restored = ck.restore(step_dir / runs.OLD_STATE, whole)["params"]
    return optim.merge(traverse_util.flatten_dict(restored, sep="/"), frozen)

  def restore(self, step: int, state: dict[str, Any], mask: Any, shardings: dict[str, Any] | None = None,
              iterator: Any | None = None) -> dict[str, Any]:
    """Restores into the structure (and shardings) of `state`; the frozen leaves are kept from `state`.

    `iterator` (a grain iterator) is restored in place when given.
    """
    trainable, frozen = optim.partition(state["params"], mask)
    if shardings is not None:
      p_sh, _ = optim.partition(shardings["params"], mask)
      o_sh, step_sh = shardings["opt"], shardings["step"]
    else:
      p_sh = {k: getattr(v, "sharding", None) for k, v in trainable.items()}
      o_sh = jax.tree.map(lambda x: getattr(x, "sharding", None), state["opt"])
      step_sh = getattr(state["step"], "sharding", None)
    params_t = _abstract(traverse_util.unflatten_dict(trainable, sep="/"), traverse_util.unflatten_dict(p_sh, sep="/"))
    opt_t = {"opt": _abstract(state["opt"], o_sh), "step": _abstract(state["step"], step_sh)}
    if self._layout(step) == runs.LAYOUT:
      items = {runs.PARAMS: ocp.args.StandardRestore(params_t), runs.OPT: ocp.args.StandardRestore(opt_t)}
    else:  # layout 1: one `state` item with all three
      items = {runs.OLD_STATE: ocp.args.StandardRestore({"params": params_t, **opt_t})}
    if iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if runs.OLD_STATE in items:
      params, opt = restored[runs.OLD_STATE]["params"], restored[runs.OLD_STATE]
    else:
      params, opt = restored[runs.PARAMS], restored[runs.OPT]
    params = optim.merge(traverse_util.flatten_dict(params, sep="/"), frozen)
    return {"params": params, "opt": opt["opt"], "step": opt["step"]}

  def restore_good(self, state: dict[str, Any], mask: Any, shardings: dict[str, Any] | None,
                   check_meta: Callable[[int, dict[str, Any]], None]) -> tuple[int | None, dict[str, Any]]:
    """(step, state) of the latest step that restores; (None, `state`) when there is no checkpoint.

    A newer step that fails to read (a truncated, garbled or missing file) is reported in one line (step, file,
    error) and moved aside (`move_aside`), so the run continues from the previous good step and saves its steps
    again. `check_meta(step, meta)` checks each candidate's meta before its arrays are read (backbone, config):
    what it raises is not damage and stops the start.

    Raises:
      runs.DamagedCheckpointError: every step fails to read (nothing is moved).
    """
    damaged: list[runs.DamagedCheckpointError] = []
    for step in sorted(self.all_steps(), reverse=True):
      step_dir = self.directory / str(step)
      try:
        meta = self.restore_meta(step)
      except Exception as e:  # pylint: disable=broad-except
        damaged.append(_damage(step_dir, e, step_dir / runs.META / "metadata"))
        continue
      check_meta(step, meta)
      try:
        restored = self.restore(step, state, mask, shardings)
      except Exception as e:  # pylint: disable=broad-except
        damaged.append(_damage(step_dir, e, step_dir))
        continue
      for d in damaged:
        log.warning("%s; moved to %s; resuming from step %d", d, self.move_aside(d.step), step)
      if damaged:
        self.manager.reload()
      return step, restored
    if damaged:
      raise runs.DamagedCheckpointError(self.directory / str(damaged[0].step), RuntimeError(
          "no checkpoint step of this run reads: " + "; ".join(str(d) for d in damaged)), self.directory)
    return None, state

  def move_aside(self, step: int) -> str:
    """Moves step `step` out of the managed folder, to <checkpoint_dir>.damaged/<step> (a new name if taken), so
    orbax neither lists it nor collides with a new save of the step; nothing is deleted. Process 0 moves."""
    aside = self.directory.parent / (self.directory.name + runs.DAMAGED_SUFFIX)
    target = aside / str(step)
    if target.exists():
      target = aside / f"{step}-{int(time.time())}"
    if jax.process_index() == 0:
      aside.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(target)
    mesh_lib.sync("damaged checkpoint moved aside")
    return str(target)


def _damage(step_dir: Any, error: Exception, reading: Any) -> runs.DamagedCheckpointError:
  d = runs.damage(step_dir, error, reading)
  if d is None:
    raise error
  return d
