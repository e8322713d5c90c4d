"""Rebuilding a run's model from its config and checkpoints: shared by training, evaluation and scoring.

Nothing here reads a dataset, so a trained model can be restored on a machine that has only the run's
workdir (its checkpoints hold the full training config) and the CLIP backbone the run names.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping

import jax
import ml_collections

from mcpf_jax import clip
from mcpf_jax.train import checkpoints as ckpt_lib
from mcpf_jax.train import identity, mesh as mesh_lib, optim, step as step_lib


def load_clip(config, workdir: pathlib.Path, *, name: str | None = None) -> clip.Bundle:
  """The run's CLIP: config.clip.name (or `name`): a hub id, folder or preset.

  "tiny" writes a tiny random HF-format CLIP into <workdir>/tiny_clip (idempotent: the same seed and sizes give
  the same weights, so a resumed run or a scorer finds the backbone it was trained on).
  """
  name = name or config.clip.name
  if name == "tiny":
    from mcpf_jax.clip.tiny import write_tiny_clip  # pylint: disable=g-import-not-at-top
    name = str(write_tiny_clip(pathlib.Path(workdir) / "tiny_clip", seed=config.clip.tiny_seed,
                               **config.clip.tiny))
  return clip.load(name, dtype=config.clip.dtype, revision=config.clip.revision, remat=config.clip.remat,
                   param_dtype=config.clip.get("param_dtype", "float32"))


def optim_config(config, steps_per_epoch: int) -> ml_collections.ConfigDict:
  """config.optim with total_steps resolved (num_epochs x steps_per_epoch when it is None)."""
  oc = config.optim.copy_and_resolve_references()
  with oc.unlocked():
    if oc.total_steps is None:
      oc.total_steps = config.train.num_epochs * steps_per_epoch
  return oc


def checkpoint_step(ckpts: ckpt_lib.Checkpoints, which: str | int) -> int:
  """The step of checkpoint `which`: "best" (by validation SRCC; the latest when none has a metric), "latest",
  or a step number.

  Raises:
    FileNotFoundError: there is no such checkpoint (the message lists the steps found).
  """
  if which == "best":
    step = ckpts.best_step() if ckpts.best_step() is not None else ckpts.latest_step()
  elif which == "latest":
    step = ckpts.latest_step()
  else:
    try:
      step = int(which)
    except (TypeError, ValueError):
      raise ValueError(f"checkpoint={which!r}: expected 'best', 'latest' or a step number") from None
  if step is None or step not in ckpts.all_steps():
    raise FileNotFoundError(f"{ckpts.directory}: no checkpoint {which!r} (found steps {ckpts.all_steps()}); "
                            "train first with the same --workdir")
  return step


def run_config(workdir: str | pathlib.Path, meta: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The config a run was trained with: its run.json (written at its start), else the one saved in the checkpoint's
  `meta` (runs of older versions). eval.py and the Scorer both take the model from here."""
  saved = identity.read(pathlib.Path(workdir))
  if saved is not None:
    return ml_collections.ConfigDict(saved[0]["config"])
  return config_from_meta(meta)


def config_from_meta(meta: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The training config saved in a checkpoint's `meta` item (JSON: tuples come back as lists)."""
  if "config" not in meta:
    raise ValueError("the checkpoint's meta item has no 'config' (written by an older version?)")
  return ml_collections.ConfigDict(json.loads(json.dumps(meta["config"])))


def restore_params(config, ckpts: ckpt_lib.Checkpoints, step: int, params: Any, labels: Any,
                   mesh: jax.sharding.Mesh) -> Any:
  """`params` with its trainable leaves replaced by those of checkpoint `step`; frozen leaves kept.

  The returned tree is placed with the shardings `mesh_lib.param_shardings(params, mesh, ...)`. The optimizer
  state is restored alongside (the checkpoint's structure needs it) and dropped; it is prompt-sized.
  """
  tx = optim.make_optimizer(optim_config(config, 1), labels)
  state = step_lib.init_state(params, tx)
  p_sh = mesh_lib.param_shardings(params, mesh, config.mesh.shard_backbone)
  s_sh = mesh_lib.state_shardings(state, p_sh, mesh)
  return ckpts.restore(step, jax.device_put(state, s_sh), labels, s_sh)["params"]


def _init_from_checkpoints(config) -> tuple[ckpt_lib.Checkpoints, int]:
  where = pathlib.Path(config.init_from).expanduser()
  directory = where / "checkpoints" if (where / "checkpoints").is_dir() else where
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
  return {"workdir": str(pathlib.Path(config.init_from).expanduser().absolute()), "step": int(step),
          "checkpoint": str(ckpts.directory / str(step))}


# Model fields that must agree for another run's trainable parameters to fit this one's (speed-only ones aside).
_SAME_MODEL_EXCEPT = ("image_chunk",)


def init_from(config, bundle: clip.Bundle, params: Any, labels: Any, mesh: jax.sharding.Mesh) -> tuple[Any, str]:
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
    ckpt_lib.check_backbone(meta, bundle.source, bundle.fingerprint, where)
    other = config_from_meta(meta)
    mine = json.loads(config.model.to_json_best_effort())
    theirs = json.loads(json.dumps(other.model.to_dict()))
    diff = sorted(k for k in set(mine) | set(theirs) if k not in _SAME_MODEL_EXCEPT and mine.get(k) != theirs.get(k))
    if diff:
      raise ValueError(f"init_from: {where} was trained with another model; its parameters do not fit this run's: "
                       + ", ".join(f"model.{k} there {theirs.get(k)!r}, here {mine.get(k)!r}" for k in diff))
    their_labels = optim.trainable_labels(params, other.model.trainable)
    restored = restore_params(other, ckpts, step, params, their_labels, mesh)
  finally:
    ckpts.close()
  del labels  # this run's trainable leaves are a subset of the tree restored (the frozen ones are the backbone's)
  return restored, str(where)
