"""The training loop and evaluation: `train_and_evaluate(config, workdir)`, `evaluate(config, workdir)`.

One jitted, donated update step over a ("data", "model") mesh; grain input whose stream at step t is a function
of t; orbax checkpoints every `train.checkpoint_every` steps, every `train.checkpoint_minutes`, on SIGTERM/SIGINT
and at the end (last K + best by validation SRCC). Starting again with the same workdir resumes from the latest
checkpoint exactly: parameters, optimizer state, step and so the position in the input stream. A NaN/inf loss,
gradient or updated parameter, or a non-finite validation score at a checkpoint, stops the run (NonFiniteError)
before anything is saved, so the last checkpoint on disk is the last good one, and the message names it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from mcpf_jax import clip, metrics, runs, scores
from mcpf_jax import model as iqa
from mcpf_jax.data import pipeline
from mcpf_jax.model import freeze
from mcpf_jax.train import checkpoints as ckpt_lib
from mcpf_jax.train import data_setup, identity, launch, optim, preemption, restore
from mcpf_jax.train import mesh as mesh_lib
from mcpf_jax.train import step as step_lib
from mcpf_jax.train.restore import optim_config as _optim_config

log = logging.getLogger("mcpf_jax")


class NonFiniteError(FloatingPointError):
  """The loss or a gradient became NaN/inf."""


@dataclasses.dataclass
class Run:
  """Everything a run builds from its config (shared by training, evaluation and scoring)."""
  config: Any
  workdir: pathlib.Path
  mesh: Any
  bundle: clip.Bundle
  model: iqa.IQAModel
  params: Any
  mask: Any  # freeze.mask of params: which leaves train
  data: data_setup.RunData

  @property
  def image_size(self) -> int:
    return self.config.data.image_size or self.bundle.config.vision.image_size

  def meta(self) -> dict[str, Any]:
    return {
        "backbone": {"source": self.bundle.source, "fingerprint": self.bundle.fingerprint},
        "dataset": self.data.name,
        "label_transform": dataclasses.asdict(self.data.score_map),
        "split": {k: len(v) for k, v in self.data.indices.items()},
        "config": json.loads(self.config.to_json_best_effort()),
    }


def build_run(config, workdir: str | pathlib.Path, *, dataset: str | None = None) -> Run:
  workdir = pathlib.Path(workdir).expanduser()
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.model)
  bundle = runs.load_clip(config, workdir)
  splits = data_setup.load(config, workdir, dataset=dataset)
  model, params = iqa.build(config.model, bundle, jax.random.key(config.seed))
  mask = freeze.mask(params, config.model.trainable)
  trainable, _ = optim.split(params, mask)
  low = sorted(k for k, v in trainable.items() if v.dtype != jnp.float32)
  if low:
    raise ValueError(f"clip.param_dtype={config.clip.param_dtype!r} stores trainable parameters in low precision "
                     f"({low[0]}, ... {len(low)} leaves): model.trainable={config.model.trainable!r} trains the "
                     "backbone, whose weights must then stay float32 (clip.param_dtype=float32)")
  return Run(config, workdir, mesh, bundle, model, params, mask, splits)


def _predict(run: Run, params: Any, indices: np.ndarray, eval_fn, batch_sharding,
             stop: preemption.StopRequest | None = None) -> np.ndarray:
  """score01 for every image in `indices` (multi-crop mean), in the order of `indices`.

  Each process decodes only its share (every N-th image of `indices` for N processes); the global batch's scores
  come back with the image index of each row, so no result depends on which process's devices hold which rows.
  `stop`: polled once per batch; a stop request raises preemption.Stopped.
  """
  cfg = run.config
  out = np.full((len(indices),), np.nan, np.float64)
  scored = np.zeros((len(indices),), bool)  # apart from `out`: a NaN score is not a missing one
  pos = {int(i): k for k, i in enumerate(indices)}
  n_proc, pid = jax.process_count(), jax.process_index()
  if cfg.eval.batch_size % n_proc:
    raise ValueError(f"eval.batch_size={cfg.eval.batch_size} must be divisible by the number of processes ({n_proc})")
  gather = mesh_lib.gather_fn(batch_sharding.mesh)
  decoded = 0
  for batch in pipeline.eval_batches(run.data.source, indices, batch_size=cfg.eval.batch_size // n_proc,
                                     image_size=run.image_size, resize=cfg.data.resize,
                                     num_crops=cfg.eval.num_crops, score_map=run.data.score_map,
                                     num_workers=cfg.data.num_workers, shard_index=pid, shard_count=n_proc):
    local = {"image": batch["image"], "index": batch["index"].astype(np.int32), "weight": batch["weight"]}
    decoded += int(batch["weight"].sum())
    glob = mesh_lib.global_batch(local, batch_sharding)
    scores = eval_fn(params, {"image": glob["image"]})
    scores, index, weight = (mesh_lib.to_host(x) for x in gather((scores, glob["index"], glob["weight"])))
    for sc, i, w in zip(scores, index, weight):
      if w:
        out[pos[int(i)]] = sc
        scored[pos[int(i)]] = True
    if stop is not None and stop.poll():
      raise preemption.Stopped("stopped on a signal during evaluation", stop.status)
  log.info("evaluated %d images; this process (%d of %d) decoded %d of them", len(indices), pid, n_proc, decoded)
  if not scored.all():
    raise RuntimeError(f"{int((~scored).sum())} images were not scored by the eval pipeline")
  if not np.isfinite(out).all():
    raise NonFiniteError(f"{int((~np.isfinite(out)).sum())} of {out.size} predicted scores are not finite")
  return out


def evaluate_part(run: Run, params: Any, part: str, eval_fn, batch_sharding,
                  stop: preemption.StopRequest | None = None) -> tuple[dict[str, Any], dict]:
  """Metrics and per-image predictions (on the dataset's MOS scale) for one part ("train" | "val" | "test" |
  "all") of the run's split."""
  idx = run.data.indices[part]
  score01 = _predict(run, params, idx, eval_fn, batch_sharding, stop)
  pred = run.data.score_map.to_mos(score01)
  mos = run.data.mos[idx]
  result = metrics.evaluate(pred, mos, higher_is_better=run.data.higher_is_better)
  result.update(dataset=run.data.name, part=part)
  rows = {"name": [run.data.names[i] for i in idx], "mos": mos, "score": pred}
  return result, rows


def _jit_steps(run: Run, tx, state_shapes):
  return step_lib.jit_steps(run.config, run.model, run.mask, tx, run.params, state_shapes, run.mesh)


def _last_good(ckpts: ckpt_lib.Checkpoints) -> str:
  """Names the last checkpoint on disk (every save is checked first), after the saves in flight are done."""
  ckpts.wait()
  step = ckpts.latest_step()
  where = (f"The last good checkpoint is step {step} in {ckpts.directory}" if step is not None else
           f"No checkpoint was saved yet in {ckpts.directory}")
  return f"{where} (lower optim.lr or check the data)."


def _saved_identity(workdir: pathlib.Path) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
  """(run.json, split.json) of a run that has checkpoints; for a run of an older version without run.json, the
  config saved in its latest checkpoint. None when nothing was trained in `workdir` yet (a fresh start)."""
  directory = workdir / "checkpoints"
  if not directory.is_dir():
    return None
  ckpts = ckpt_lib.Checkpoints(directory, read_only=True)
  try:
    step = ckpts.latest_step()
    if step is None:
      return None
    saved = identity.read(workdir)
    if saved is not None:
      return saved
    meta = ckpts.restore_meta(step)
    return {"config": runs.config_from_meta(meta).to_dict(), "from": f"checkpoint {directory / str(step)}"}, None
  finally:
    ckpts.close()


def _check_identity(run: Run, saved: tuple[dict[str, Any], dict[str, Any] | None] | None) -> dict[str, Any]:
  """Checks the dataset and the split against the saved identity (refusing a changed one), and writes run.json and
  split.json at a fresh start (process 0). Returns the run's identity record."""
  ds = identity.dataset_identity(run.data.source, run.data.name)
  split = identity.split_record(run.config, run.data.names, run.data.indices)
  if saved is not None:
    run_rec, split_rec = saved
    if "dataset" in run_rec:
      identity.check_dataset(run_rec["dataset"], ds, run.workdir)
    if split_rec is not None and any(split_rec[k] != split[k] for k in ("train", "val", "test")):
      raise identity.RunMismatchError(f"{run.workdir}: the split computed now is not the one in "
                                      f"{run.workdir / identity.SPLIT_FILE}; nothing was changed")
    if "dataset" in run_rec and split_rec is not None:
      return run_rec
  record = {"format": identity.FORMAT, "config": identity.config_dict(run.config), "dataset": ds,
            "split": {k: split[k] for k in ("protocol", "split_seed", "train_fraction", "val_fraction")} |
                     {f"num_{k}": len(split[k]) for k in ("train", "val", "test")},
            "backbone": {"source": run.bundle.source, "fingerprint": run.bundle.fingerprint},
            "init_from": None}
  if run.config.init_from:
    record["init_from"] = restore.init_from_source(run.config)
  if jax.process_index() == 0:
    identity.write(run.workdir, record, split)
  mesh_lib.sync(f"identity of {run.workdir}")
  return record


def train_and_evaluate(config, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Trains (resuming from the workdir's latest checkpoint if any), then evaluates the test split.

  A restart must use the config the run started with, up to the fields that do not change what is computed
  (identity.OBSERVE): anything else is refused (identity.RunMismatchError) before the workdir is touched.
  Returns the final summary (also written to <workdir>/train_summary.json).
  """
  workdir = pathlib.Path(workdir).expanduser()
  saved = _saved_identity(workdir)
  if saved is not None:
    for key, old, new in identity.compare(saved[0]["config"], config, workdir):
      log.info("restart with %s changed: %s -> %s (does not change what is computed)", key, old, new)
  run = build_run(config, workdir)
  cfg, workdir = run.config, run.workdir
  _check_identity(run, saved)
  n_proc = jax.process_count()
  if cfg.train.batch_size % (run.mesh.shape["data"] * cfg.train.accumulate_steps) or cfg.train.batch_size % n_proc:
    raise ValueError(f"train.batch_size={cfg.train.batch_size} must be divisible by the mesh data axis "
                     f"({run.mesh.shape['data']}) x train.accumulate_steps ({cfg.train.accumulate_steps}) and "
                     f"by the number of processes ({n_proc})")
  if cfg.eval.batch_size % run.mesh.shape["data"]:
    raise ValueError(f"eval.batch_size={cfg.eval.batch_size} must be divisible by the mesh data axis "
                     f"({run.mesh.shape['data']})")
  train_idx = run.data.indices["train"]
  steps_per_epoch = len(train_idx) // cfg.train.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"{run.data.name}: {len(train_idx)} training images is fewer than one batch of "
                     f"{cfg.train.batch_size}")
  ocfg = _optim_config(cfg, steps_per_epoch)
  total = ocfg.total_steps
  tx = optim.make_optimizer(ocfg, run.mask)
  state = step_lib.init_state(run.params, tx)
  train_step, eval_step, s_sh, _p_sh, b_sh = _jit_steps(run, tx, state)
  state = jax.device_put(state, s_sh)

  ckpts = ckpt_lib.Checkpoints(workdir / "checkpoints", keep=cfg.train.keep)
  meta = run.meta()
  start = 0
  if ckpts.latest_step() is not None:
    start = ckpts.latest_step()
    runs.check_backbone(ckpts.restore_meta(start), run.bundle.source, run.bundle.fingerprint, ckpts.directory)
    state = ckpts.restore(start, state, run.mask, s_sh)
    log.info("resumed from %s/%d", ckpts.directory, start)
  elif cfg.init_from:
    params, where = restore.init_from(cfg, run.bundle, run.params, run.mask, run.mesh)
    state = dict(state, params=jax.device_put(params, s_sh["params"]))
    log.info("step 0 starts from the trainable weights of %s", where)
  # The input stream at step t is a function of t alone (one global order), so a resumed run, on any number of
  # processes or workers, continues exactly where the checkpoint is.
  loader = pipeline.train_loader(run.data.source, train_idx, batch_size=cfg.train.batch_size,
                                 image_size=run.image_size, resize=cfg.data.resize, seed=cfg.seed,
                                 score_map=run.data.score_map, num_workers=cfg.data.num_workers,
                                 shard_index=jax.process_index(), shard_count=n_proc, start_batch=start)
  # Batches reach the devices ahead of the step that needs them.
  device_batches = mesh_lib.prefetch_to_device(loader, b_sh, size=cfg.data.prefetch_to_device)
  log.info("%s | %s on %s: %d train / %d val / %d test images, %d steps (%d per epoch), %d trainable of %d "
           "parameters", launch.topology(run.mesh), cfg.model.name, run.data.name, len(train_idx),
           len(run.data.indices["val"]), len(run.data.indices["test"]), total, steps_per_epoch,
           freeze.count(run.params, run.mask), freeze.count(run.params))

  writer = None
  if jax.process_index() == 0:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    writer = SummaryWriter(str(workdir / "tensorboard"))
  schedule = optim.learning_rate_schedule(ocfg)
  bar = tqdm.tqdm(total=total, initial=start, desc="train", unit="step", disable=jax.process_index() != 0,
                  dynamic_ncols=True)
  tick, seen, last_val = time.perf_counter(), 0, None
  # Metrics stay on the device until a log step or a save: the host does not wait for the device every step.
  # Every pending step is checked for non-finite values before anything is saved.
  pending: list[tuple[int, dict[str, jax.Array]]] = []

  def check_finite() -> dict[str, np.ndarray] | None:
    fetched = [(s, {k: mesh_lib.to_host(v) for k, v in m.items()}) for s, m in pending]
    pending.clear()
    for s, m in fetched:
      if not m["finite"]:
        raise NonFiniteError(f"step {s}: loss={m['loss']}, grad_norm={m['grad_norm']} or the updated "
                             f"parameters are not finite; stopped without saving. {_last_good(ckpts)}")
    return fetched[-1][1] if fetched else None

  def save(step: int, val_metrics: dict[str, float] | None) -> None:
    ckpts.save(step, state, run.mask, None, meta, val_metrics)

  def stopped(step: int, where: str) -> preemption.Stopped:
    """Saves `step` (not validated: it does not compete for the best checkpoint), waits until it is durable."""
    check_finite()
    if ckpts.latest_step() != step:
      save(step, None)
    ckpts.wait()
    ckpts.close()
    bar.close()
    message = (f"stopped on a signal {where}; saved step {step} in {ckpts.directory}. Run the same command again "
               "to resume from it")
    log.warning("%s", message)
    return preemption.Stopped(message, stop.status)

  stop = preemption.StopRequest().install()
  last_save = time.monotonic()
  try:
    for step in range(start, total):
      state, m = train_step(state, next(device_batches))
      done = step + 1
      pending.append((done, m))
      seen += cfg.train.batch_size
      bar.update(1)
      if stop.poll():
        raise stopped(done, f"at step {done}")
      log_now = done % cfg.train.log_every == 0 or done == total
      if log_now:
        m = check_finite()
        rate = seen / (time.perf_counter() - tick)
        bar.set_postfix(loss=f"{float(m['loss']):.4f}", img_s=f"{rate:.1f}")
        if writer is not None:
          for k, v in m.items():
            if k != "finite":
              writer.add_scalar(f"train/{k}", float(v), done)
          writer.add_scalar("train/lr", float(schedule(done)), done)
          writer.add_scalar("train/images_per_second", rate, done)
        tick, seen = time.perf_counter(), 0
      if done % cfg.train.checkpoint_every == 0 or done == total:
        check_finite()
        val_metrics = None
        if len(run.data.indices["val"]) >= 3:
          try:
            val, _ = evaluate_part(run, state["params"], "val", eval_step, b_sh, stop)
          except NonFiniteError as e:  # finite but huge parameters: not a checkpoint worth keeping
            raise NonFiniteError(f"step {done}: validation: {e}; stopped without saving. {_last_good(ckpts)}") from e
          except preemption.Stopped:
            raise stopped(done, f"during the validation of step {done}") from None
          val_metrics = {runs.BEST_METRIC: float(val["srcc"])}
          last_val = val
          if writer is not None:
            writer.add_scalar("val/srcc", val["srcc"], done)
            writer.add_scalar("val/plcc", val["plcc"], done)
        save(done, val_metrics)
        last_save = time.monotonic()
        tick, seen = time.perf_counter(), 0
      elif log_now and _time_to_save(last_save, cfg.train.checkpoint_minutes):
        check_finite()
        save(done, None)  # time-based: not validated (the best checkpoint must not depend on the clock)
        last_save = time.monotonic()
    bar.close()
    ckpts.wait()
    test, rows = evaluate_part(run, state["params"], "test", eval_step, b_sh, stop)
  except preemption.Stopped:
    ckpts.close()
    raise
  finally:
    stop.uninstall()
  summary = {"step": int(total), "test": test, "val": last_val, "devices": jax.device_count(),
             "processes": jax.process_count(), "mesh": dict(run.mesh.shape), "checkpoints": ckpts.all_steps(),
             "best_step": ckpts.best_step()}
  if jax.process_index() == 0:
    (workdir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _write_predictions(workdir / "test_predictions.csv", rows)
    if writer is not None:
      writer.add_scalar("test/srcc", test["srcc"], total)
      writer.close()
  ckpts.close()
  log.info("done: %s step %d | test SRCC %.4f PLCC %.4f (%d images) | %s | written to %s (train_summary.json, "
           "test_predictions.csv, checkpoints/)", run.data.name, total, test["srcc"], test["plcc"], test["num_images"],
           mesh_lib.describe(run.mesh), workdir)
  return summary


def _time_to_save(last_save: float, minutes: float) -> bool:
  """Whether `minutes` have passed since the last save, decided by process 0's clock for every process."""
  if not minutes:
    return False
  due = time.monotonic() - last_save >= 60.0 * minutes
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    due = bool(multihost_utils.broadcast_one_to_all(np.asarray(due, np.int32)))
  return due


def eval_config(saved: Mapping[str, Any], config=None, explicit: Mapping[str, Any] | None = None
                ) -> ml_collections.ConfigDict:
  """The config an evaluation runs with: the run's own (`saved`), with the evaluation fields (`eval.*`) and the
  free fields (identity.OBSERVE / IDENTITY_BY_FINGERPRINT: mesh, where the backbone and data live) of `config`.

  `config`'s other fields are not used (a warning lists those that differ from the run's). `explicit`: the fields
  set on the command line (`--config.x=y`); one that is not an evaluation or free field and differs from the run's
  value is refused (identity.RunMismatchError), since the run cannot be evaluated as something it was not.
  """
  cfg = ml_collections.ConfigDict(identity.config_dict(saved))
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


def evaluate(config, workdir: str | pathlib.Path, *, checkpoint: str | int | None = None,
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
  workdir = pathlib.Path(workdir).expanduser()
  directory = workdir / "checkpoints"
  if not directory.is_dir():
    raise FileNotFoundError(f"{workdir}: no checkpoints/ folder; train first with train.py --workdir {workdir}")
  ckpts = ckpt_lib.Checkpoints(directory, read_only=True)
  saved = identity.read(workdir)
  latest = ckpts.latest_step()
  if latest is None:
    raise FileNotFoundError(f"{directory}: no checkpoint; train first with the same --workdir")
  run_cfg = (saved[0]["config"] if saved is not None else
             runs.config_from_meta(ckpts.restore_meta(latest)).to_dict())
  cfg = eval_config(run_cfg, config, explicit)
  step = runs.checkpoint_step(ckpts, checkpoint if checkpoint is not None else cfg.eval.checkpoint)
  meta = ckpts.restore_meta(step)
  dataset = dataset or cfg.eval.dataset
  cross = dataset is not None and dataset != meta["dataset"]
  run = build_run(cfg, workdir, dataset=dataset if cross else None)
  runs.check_backbone(meta, run.bundle.source, run.bundle.fingerprint, ckpts.directory)
  if not cross and saved is not None:
    run_rec, split_rec = saved
    if "dataset" in run_rec:
      identity.check_dataset(run_rec["dataset"], identity.dataset_identity(run.data.source, run.data.name), workdir)
    if split_rec is not None:
      run.data.indices.update(identity.indices_from_split(split_rec, run.data.names, workdir))
  # Scores map to the MOS scale of the TRAINING part, as saved, whatever dataset is evaluated.
  run.data = dataclasses.replace(run.data, score_map=scores.ScoreMap(**meta["label_transform"]))
  part = "all" if cross else (part or "test")
  tx = optim.make_optimizer(_optim_config(cfg, 1), run.mask)
  _, eval_step, _, _, b_sh = _jit_steps(run, tx, step_lib.init_state(run.params, tx))
  params = restore.restore_params(cfg, ckpts, step, run.params, run.mask, run.mesh)
  try:
    with preemption.StopRequest() as stop:
      result, rows = evaluate_part(run, params, part, eval_step, b_sh, stop)
  except preemption.Stopped:
    ckpts.close()
    raise
  result.update(checkpoint_step=int(step), trained_on=meta["dataset"])
  if jax.process_index() == 0:
    (workdir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    _write_predictions(workdir / "eval_predictions.csv", rows)
    _scatter(workdir / "eval_scatter.png", rows, result)
  ckpts.close()
  return result


def _write_predictions(path: pathlib.Path, rows: dict) -> None:
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["name", "mos", "score"])
    for name, mos, score in zip(rows["name"], rows["mos"], rows["score"]):
      w.writerow([name, f"{mos:.6f}", f"{score:.6f}"])


def _scatter(path: pathlib.Path, rows: dict, result: dict) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
  ax.scatter(rows["score"], rows["mos"], s=10, alpha=0.7)
  ax.set_xlabel("predicted score (MOS scale)")
  ax.set_ylabel("MOS" if "higher" in result["label_direction"] else "DMOS")
  ax.set_title(f"{result['dataset']} ({result['part']}): SRCC {result['srcc']:.3f}, PLCC {result['plcc']:.3f}, "
               f"n={result['num_images']}", fontsize=9)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
