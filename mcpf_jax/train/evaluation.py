"""Evaluation: the scores of a model on a part of a dataset's split (`Evaluator`: the training loop's validation and
test, and eval.py's `evaluate(config, workdir)`, which restores a checkpoint and evaluates it as the run was trained,
`eval_config`, without building an optimizer).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from mcpf_jax import metrics, resolve, rundir, runs, scores
from mcpf_jax.data import pipeline
from mcpf_jax.train import checkpoints as ckpt_lib
from mcpf_jax.train import data_setup, hosts, identity, preemption, reports, restore
from mcpf_jax.train import mesh as mesh_lib
from mcpf_jax.train import step as step_lib
from mcpf_jax.train.build import build_run

log = logging.getLogger("mcpf_jax")


class NonFiniteError(FloatingPointError):
  """The loss, a gradient, an updated parameter or a predicted score became NaN/inf."""


class ScoreTable:
  """The score of every image of `indices`, filled from gathered global batches of (score, image index, weight).

  Padding rows (weight 0) are never scored; an image outside `indices` or scored twice is an error (each image is
  decoded by exactly one data shard), and `result` refuses a table with an image left unscored.
  """

  def __init__(self, indices: np.ndarray):
    self.scores = np.full((len(indices),), np.nan, np.float64)
    self.scored = np.zeros((len(indices),), bool)  # apart from `scores`: a NaN score is not a missing one
    self._pos = {int(i): k for k, i in enumerate(indices)}

  def add(self, scores: np.ndarray, index: np.ndarray, weight: np.ndarray) -> None:
    for sc, i, w in zip(scores, index, weight):
      if not w:
        continue
      k = self._pos.get(int(i))
      if k is None:
        raise RuntimeError(f"the eval pipeline scored image {int(i)}, which is not one of the images evaluated")
      if self.scored[k]:
        raise RuntimeError(f"the eval pipeline scored image {int(i)} twice (two data shards decoded it)")
      self.scores[k], self.scored[k] = sc, True

  def result(self) -> np.ndarray:
    if not self.scored.all():
      raise RuntimeError(f"{int((~self.scored).sum())} images were not scored by the eval pipeline")
    if not np.isfinite(self.scores).all():
      raise NonFiniteError(f"{int((~np.isfinite(self.scores)).sum())} of {self.scores.size} predicted scores are "
                           "not finite")
    return self.scores


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """Scores and metrics of a model on images of one dataset, as a run evaluates them: `image_size` crops of the
  run's preprocessing (data.resize, eval.num_crops), eval.batch_size images per global batch, scores mapped to the
  MOS scale by `data.score_map`. Validation, test, cross-dataset evaluation and eval.py are instances of it; it
  needs parameters and the eval step (`step.jit_eval`), no optimizer."""
  config: Any
  data: data_setup.RunData
  image_size: int
  eval_fn: Callable[[Any, dict[str, jax.Array]], jax.Array]
  batch_sharding: jax.sharding.NamedSharding

  def predict(self, params: Any, indices: np.ndarray, stop: preemption.StopRequest | None = None) -> np.ndarray:
    """score01 for every image in `indices` (multi-crop mean), in the order of `indices`.

    eval.batch_size images per global batch (already a multiple of the mesh's data axis: `resolve.resolve`), the
    last one padded with rows that are never scored. Each data shard (`mesh.data_shard`: the processes whose
    devices hold the same rows of a batch) decodes every count-th image of `indices`, so processes that share a
    shard decode the same images; the global batch's scores come back with the image index of each row, so no
    result depends on which process's devices hold which rows. `stop`: polled once per batch; a stop request
    raises preemption.Stopped.
    """
    cfg, batch_sharding = self.config, self.batch_sharding
    table = ScoreTable(indices)
    batch_size = cfg.eval.batch_size
    shard = mesh_lib.data_shard(batch_sharding)
    gather = mesh_lib.gather_fn(batch_sharding.mesh)
    decoded = 0
    batches = pipeline.eval_batches(self.data.source, indices,
                                    batch_size=shard.local_size("eval.batch_size", batch_size),
                                    image_size=self.image_size, resize=cfg.data.resize, num_crops=cfg.eval.num_crops,
                                    score_map=self.data.score_map, num_workers=cfg.data.num_workers,
                                    num_threads=pipeline.AUTO, shard_index=shard.index, shard_count=shard.count)
    for batch in mesh_lib.checked_first(batches, shard, "evaluation input"):
      local = {"image": batch["image"], "index": batch["index"].astype(np.int32), "weight": batch["weight"]}
      decoded += int(batch["weight"].sum())
      glob = mesh_lib.global_batch(local, batch_sharding, batch_size)
      scores = self.eval_fn(params, {"image": glob["image"]})
      table.add(*(mesh_lib.to_host(x) for x in gather((scores, glob["index"], glob["weight"]))))
      if stop is not None and stop.poll():
        raise preemption.Stopped(f"stopped {stop.reason} during evaluation", stop.status)
    log.info("evaluated %d images; this process (%d of %d, data shard %d of %d) decoded %d of them", len(indices),
             jax.process_index(), jax.process_count(), shard.index, shard.count, decoded)
    return table.result()

  def __call__(self, params: Any, part: str, stop: preemption.StopRequest | None = None
               ) -> tuple[dict[str, Any], dict]:
    """Metrics and per-image predictions (on the dataset's MOS scale) for one part ("train" | "val" | "test" |
    "all") of the data's split."""
    data = self.data
    idx = data.indices[part]
    pred = data.score_map.to_mos(self.predict(params, idx, stop))
    mos = data.mos[idx]
    result = metrics.evaluate(pred, mos, higher_is_better=data.higher_is_better)
    result.update(dataset=data.name, part=part)
    rows = {"name": [data.names[i] for i in idx], "mos": mos, "score": pred}
    return result, rows


def eval_config(saved: Mapping[str, Any], config=None, explicit: Mapping[str, Any] | None = None
                ) -> ml_collections.ConfigDict:
  """The config an evaluation runs with: the run's own (`saved`), with the evaluation fields (`eval.*`) and the
  free fields (identity.OBSERVE / IDENTITY_BY_FINGERPRINT: mesh, where the backbone and data live) of `config`.

  `config`'s other fields are not used (a warning lists those that differ from the run's). `explicit`: the fields
  set on the command line (`--config.x=y`); one that is not an evaluation or free field and differs from the run's
  value is refused (identity.RunMismatchError), since the run cannot be evaluated as something it was not.
  """
  saved = runs.upgrade_config(identity.config_dict(saved))
  cfg = ml_collections.ConfigDict(saved)
  if config is None:
    return cfg
  run_values = identity.flatten(identity.config_dict(saved))
  refused = [(k, run_values.get(k, "<absent>"), v) for k, v in (explicit or {}).items()
             if not (identity.is_eval_field(k) or identity.is_free(k))
             and identity.config_dict({"v": v})["v"] != run_values.get(k, "<absent>")]
  if refused:
    lines = "\n".join(f"  {k}: the run has {json.dumps(a)}, the command line asks for {json.dumps(b, default=str)}"
                      for k, a, b in refused)
    raise identity.RunMismatchError(
        "a run is evaluated as it was trained; only eval.* fields (and where the data, backbone and devices "
        f"are) may be overridden:\n{lines}")
  applied, ignored = {}, []
  for key, old, new in identity.differences(saved, config):
    if identity.is_eval_field(key) or identity.is_free(key):
      if new != "<absent>":
        applied[key] = new
    else:
      ignored.append(f"{key}={json.dumps(new)} (the run has {json.dumps(old)})")
  if ignored:
    log.warning("the run's own config is used; not used from --config: %s", "; ".join(ignored))
  with cfg.unlocked():
    for key, value in applied.items():
      *path, leaf = key.split(".")
      node = cfg
      for part in path:
        node = node[part]
      node[leaf] = value
  return cfg


def evaluate(config, workdir: str | os.PathLike[str], *, checkpoint: str | int | None = None,
             dataset: str | None = None, part: str | None = None,
             explicit: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Restores a checkpoint and evaluates it; writes eval.json, eval_predictions.csv and eval_scatter.png.

  The model, backbone, split, preprocessing and score mapping are the run's own (its run.json and split.json, or
  for runs of older versions the config saved in the checkpoint); `config` (optional) contributes only its
  evaluation fields (see `eval_config`). The run's own test split is exactly the test images listed in its
  split.json, and the dataset must still be the one it was trained on (same fingerprint).

  Args:
    config: a config file's ConfigDict, or None (everything from the run).
    checkpoint: "best", "latest" or a step (default: eval.checkpoint).
    dataset: another dataset to evaluate on (cross-dataset: all its images); default eval.dataset or the
      training dataset's test split.
    part: which part of the run's split of the training dataset ("test" by default).
    explicit: the config fields set on the command line (refused unless evaluation fields; `eval_config`).
  """
  workdir = rundir.path(workdir)
  # Process 0 reads the run's identity; the others receive it (hosts.from_process_0), after the check that every
  # process sees the run folder and its checkpoints.
  def there() -> None:
    if not rundir.is_remote(workdir) and not workdir.is_dir():
      raise FileNotFoundError(f"{workdir}: no such run folder; train first with train.py --workdir {workdir}")

  hosts.from_process_0(there)
  hosts.check_run_folder(workdir)
  saved = hosts.from_process_0(lambda: identity.read(workdir), (identity.RunMismatchError, ValueError))
  # The checkpoints are where the run put them (its run.json's checkpoint_dir), unless the command line moves them.
  configured = (explicit or {}).get("checkpoint_dir") or (saved[0]["config"].get("checkpoint_dir") if saved else None)
  directory = rundir.checkpoint_dir(workdir, configured)
  hosts.check_checkpoint_folder(workdir, directory, existing_only=True)
  if not directory.is_dir():
    raise FileNotFoundError(f"{workdir}: no checkpoints/ folder; train first with train.py --workdir {workdir}")
  ckpts = ckpt_lib.Checkpoints(directory, read_only=True)
  latest = ckpts.latest_step()
  if latest is None:
    raise FileNotFoundError(f"{directory}: no checkpoint; train first with the same --workdir")
  run_cfg = resolve.saved_config(saved[0] if saved is not None else None, lambda: ckpts.restore_meta(latest))
  cfg = resolve.resolve(eval_config(run_cfg.to_dict(), config, explicit), training=False)
  # A damaged step: "best" falls back to the next best that reads; "latest" or a step number names the damaged file
  # and the steps that read (nothing is moved: a reader changes nothing in the run).
  step = runs.readable_step(ckpts, checkpoint if checkpoint is not None else cfg.eval.checkpoint)
  meta = ckpts.restore_meta(step)
  if saved is not None and "config" in meta:
    identity.check_checkpoint_config(meta["config"], saved[0]["config"], ckpts.directory / str(step),
                                     workdir / identity.RUN_FILE)
  dataset = dataset or cfg.eval.dataset
  cross = dataset is not None and dataset != meta["dataset"]
  run = build_run(cfg, workdir, dataset=dataset if cross else None)
  runs.check_backbone(meta, run.bundle.source, run.bundle.fingerprint, ckpts.directory)
  indices = run.data.indices
  if not cross and saved is not None:
    identity.check_saved_dataset(saved, run.data, workdir)
    if saved[1] is not None:
      indices = dict(indices, **identity.indices_from_split(saved[1], run.data.names, workdir))
  # Scores map to the MOS scale of the TRAINING part, as saved, whatever dataset is evaluated.
  data = dataclasses.replace(run.data, indices=indices, score_map=scores.ScoreMap(**meta["label_transform"]))
  part = "all" if cross else (part or "test")
  eval_step, _, b_sh = step_lib.jit_eval(cfg, run.model, run.params, run.mesh)
  params = restore.restore_params(cfg, ckpts, step, run.params, run.mask, run.mesh)
  evaluator = Evaluator(cfg, data, run.image_size, eval_step, b_sh)
  try:
    with preemption.StopRequest() as stop:
      result, rows = evaluator(params, part, stop)
  except preemption.Stopped:
    ckpts.close()
    raise
  result.update(checkpoint_step=int(step), trained_on=meta["dataset"])
  if jax.process_index() == 0:
    rundir.write_json_atomic(workdir / rundir.EVAL_FILE, result, indent=2)
    reports.write_predictions(workdir / rundir.EVAL_PREDICTIONS_FILE, rows)
    reports.scatter(workdir / rundir.EVAL_SCATTER_FILE, rows, result)
  ckpts.close()
  return result
