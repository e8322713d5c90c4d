"""Rebuilding a run's model from its config and checkpoints: shared by training and evaluation.

Nothing here reads a dataset. What inference needs of a run (its config, checkpoint steps, CLIP, trainable
parameters) lives in `mcpf_jax.runs`, outside train/, and is re-exported here.
"""

from __future__ import annotations

import json
from typing import Any

import jax

from mcpf_jax import clip, rundir, runs
from mcpf_jax.model import freeze
from mcpf_jax.resolve import saved_config
from mcpf_jax.runs import check_backbone, checkpoint_step
from mcpf_jax.train import checkpoints as ckpt_lib
from mcpf_jax.train import mesh as mesh_lib


def restore_params(config, ckpts: ckpt_lib.Checkpoints, step: int, params: Any, mask: Any,
                   mesh: jax.sharding.Mesh) -> Any:
  """`params` with its trainable leaves replaced by those of checkpoint `step`; frozen leaves kept.

  The returned tree is placed with the shardings `mesh_lib.param_shardings(params, mesh, ...)`. Only the
  checkpoint's parameters are read: no optimizer is built and its state is not restored.
  """
  p_sh = mesh_lib.param_shardings(params, mesh, config.mesh.shard_backbone)
  return ckpts.restore_params(step, jax.device_put(params, p_sh), mask, p_sh)


def _init_from_checkpoints(config) -> tuple[ckpt_lib.Checkpoints, int]:
  where = rundir.path(config.init_from)
  directory = runs.checkpoint_dir(where)  # its run.json's checkpoint_dir, or <init_from>/checkpoints
  directory = directory if directory.is_dir() else where  # init_from may be the checkpoints folder itself
  if not directory.is_dir():
    raise FileNotFoundError(f"init_from={config.init_from!r}: no run there (expected a training run's workdir "
                            "with checkpoints/)")
  ckpts = ckpt_lib.Checkpoints(directory, read_only=True)
  try:
    step = checkpoint_step(ckpts, config.init_from_checkpoint)
  except Exception:
    ckpts.close()
    raise
  return ckpts, step


def init_from_source(config) -> dict[str, Any]:
  """Where `config.init_from` points: {"workdir", "checkpoint", "step"} (the step "best"/"latest" resolve to)."""
  ckpts, step = _init_from_checkpoints(config)
  ckpts.close()
  return {"workdir": str(rundir.absolute(config.init_from)), "step": int(step),
          "checkpoint": str(ckpts.directory / str(step))}


def init_from(config, bundle: clip.Bundle, params: Any, mask: Any, mesh: jax.sharding.Mesh) -> tuple[Any, str]:
  """`params` with the trainable leaves of another run's checkpoint (`config.init_from`): a new run that starts
  from trained prompts and fusion (e.g. fine-tuning on a second dataset). The optimizer state is not taken.

  Raises:
    FileNotFoundError: no such run or checkpoint.
    ValueError: the other run used another backbone, or a model whose trainable parameters differ from this one's
      (the differing model fields are named).
  """
  ckpts, step = _init_from_checkpoints(config)
  try:
    meta = ckpts.restore_meta(step)
    where = ckpts.directory / str(step)
    check_backbone(meta, bundle.source, bundle.fingerprint, where)
    other = saved_config(None, meta)
    mine = json.loads(config.model.to_json_best_effort())
    theirs = json.loads(json.dumps(other.model.to_dict()))
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if diff:
      raise ValueError(f"init_from: {where} was trained with another model; its parameters do not fit this run's: "
                       + ", ".join(f"model.{k} there {theirs.get(k)!r}, here {mine.get(k)!r}" for k in diff))
    their_mask = freeze.mask(params, other.model.trainable)
    restored = restore_params(other, ckpts, step, params, their_mask, mesh)
  finally:
    ckpts.close()
  del mask  # this run's trainable leaves are a subset of the tree restored (the frozen ones are the backbone's)
  return restored, str(where)
