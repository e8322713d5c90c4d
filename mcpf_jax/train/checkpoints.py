"""Orbax checkpoints of a run: trainable parameters, optimizer state, step, and metadata (and optionally a grain
iterator's state; the trainer needs none: its input stream is a function of the step).

Layout: <workdir>/checkpoints/<step>/{state, data, meta}. The frozen CLIP backbone is never copied into a
checkpoint: `meta` names it (source + fingerprint) and `check_backbone` refuses to resume on other weights.
Kept: the last `keep` checkpoints and the best one by validation SRCC.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import traverse_util
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from mcpf_jax.train import optim

BEST_METRIC = "val_srcc"


def _best_metric(metrics: dict[str, Any]) -> float:
  # A NaN SRCC (constant predictions) ranks last instead of making the sort order undefined.
  value = float(metrics[BEST_METRIC])
  return value if math.isfinite(value) else -math.inf


class Checkpoints:
  """A thin wrapper over `ocp.CheckpointManager` with this project's items."""

  def __init__(self, directory: str | pathlib.Path, keep: int = 3, *, read_only: bool = False):
    self.directory = pathlib.Path(directory).expanduser().absolute()
    # BestN sorts ascending (reverse=False) and keeps the last n: the highest SRCC. best_fn must be set too, or
    # orbax neither writes the metrics nor tracks best_step() (which then returns the latest step).
    policy = pp.AnyPreservationPolicy([
        pp.LatestN(n=keep),
        pp.BestN(get_metric_fn=_best_metric, reverse=False, n=1, keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=_best_metric, best_mode="max",
                                           read_only=read_only, create=not read_only,
                                           cleanup_tmp_directories=not read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return self.manager.best_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: dict[str, Any], labels: Any, iterator: Any | None, meta: dict[str, Any],
           metrics: dict[str, float] | None = None) -> None:
    trainable, _ = optim.split(state["params"], labels)
    items = {
        "state": ocp.args.StandardSave({"params": traverse_util.unflatten_dict(trainable, sep="/"),
                                        "opt": state["opt"], "step": state["step"]}),
        "meta": ocp.args.JsonSave(meta),
    }
    if iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(iterator)
    self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()

  def restore_meta(self, step: int) -> dict[str, Any]:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, state: dict[str, Any], labels: Any, shardings: dict[str, Any] | None = None,
              iterator: Any | None = None) -> dict[str, Any]:
    """Restores into the structure (and shardings) of `state`; the frozen leaves are kept from `state`.

    `iterator` (a grain iterator) is restored in place when given.
    """
    trainable, frozen = optim.split(state["params"], labels)
    target = {"params": traverse_util.unflatten_dict(trainable, sep="/"), "opt": state["opt"], "step": state["step"]}
    if shardings is not None:
      p_sh, _ = optim.split(shardings["params"], labels)
      sh = {"params": traverse_util.unflatten_dict(p_sh, sep="/"), "opt": shardings["opt"], "step": shardings["step"]}
    else:
      sh = jax.tree.map(lambda x: getattr(x, "sharding", None), target)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target, sh)
    items = {"state": ocp.args.StandardRestore(abstract)}
    if iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))["state"]
    params = optim.merge(traverse_util.flatten_dict(restored["params"], sep="/"), frozen)
    return {"params": params, "opt": restored["opt"], "step": restored["step"]}


def check_backbone(meta: dict[str, Any], source: str, fingerprint: str, where: pathlib.Path) -> None:
  """The backbone a checkpoint was trained on must be the one loaded now (same parameter values)."""
  saved = meta.get("backbone", {})
  if saved.get("fingerprint") != fingerprint:
    raise ValueError(f"{where}: the checkpoint was trained on the CLIP backbone {saved.get('source')!r} "
                     f"(fingerprint {saved.get('fingerprint')}), but the configured backbone {source!r} has "
                     f"fingerprint {fingerprint}; point clip.name at the original weights")
