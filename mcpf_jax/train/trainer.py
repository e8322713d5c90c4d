"""The training loop: `train_and_evaluate(config, workdir)` (evaluation is in evaluation.py, the run in build.py).

One jitted, donated update step over a ("data", "model") mesh; grain input whose stream at step t is a function
of t; orbax checkpoints every `train.checkpoint_every` steps, every `train.checkpoint_minutes`, on SIGTERM/SIGINT
and at the end (last K + best by validation SRCC). Starting again with the same workdir resumes from the latest
checkpoint exactly: parameters, optimizer state, step and so the position in the input stream. A NaN/inf loss,
gradient or updated parameter, or a non-finite validation score at a checkpoint, stops the run (NonFiniteError)
before anything is saved, so the last checkpoint on disk is the last good one, and the message names it.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import numpy as np
import tqdm

from mcpf_jax import resolve, rundir, runs
from mcpf_jax.data import pipeline
from mcpf_jax.model import freeze
from mcpf_jax.train import checkpoints as ckpt_lib
from mcpf_jax.train import feed as feed_lib
from mcpf_jax.train import hosts, identity, launch, optim, preemption, reports, restore
from mcpf_jax.train import mesh as mesh_lib
from mcpf_jax.train import step as step_lib
from mcpf_jax.train.build import Run, build_run
from mcpf_jax.train.evaluation import Evaluator, NonFiniteError

log = logging.getLogger("mcpf_jax")


def _last_good(ckpts: ckpt_lib.Checkpoints) -> str:
  """Names the last checkpoint on disk (every save is checked first), after the saves in flight are done."""
  ckpts.wait()
  step = ckpts.latest_step()
  where = (f"The last good checkpoint is step {step} in {ckpts.directory}" if step is not None else
           f"No checkpoint was saved yet in {ckpts.directory}")
  return f"{where} (lower optim.lr or check the data)."


def _saved_identity(workdir: os.PathLike[str], directory: os.PathLike[str]
                    ) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
  """(run.json, split.json) of a run that has checkpoints (in `directory`); for a run of an older version without
  run.json, the config saved in its latest checkpoint. None when nothing was trained in `workdir` yet (a fresh
  start).

  Raises:
    identity.RunMismatchError: `directory` holds no checkpoint but the run's own checkpoint_dir (run.json) does: a
      restart that forgot --config.checkpoint_dir would otherwise start the run again from step 0.
  """
  if not directory.is_dir() or not _has_steps(directory):
    own = runs.checkpoint_dir(workdir)
    if str(own) != str(directory) and own.is_dir() and _has_steps(own):
      raise identity.RunMismatchError(
          f"{workdir}: this run's checkpoints are in {own} (its run.json), not in {directory}; nothing was changed. "
          f"Resume with --config.checkpoint_dir={own}, or use a new --workdir for a new run")
    return None
  ckpts = ckpt_lib.Checkpoints(directory, read_only=True)
  try:
    step = ckpts.latest_step()
    if step is None:
      return None
    # Process 0 reads run.json / split.json; the others receive them (the listing and the orbax calls around this
    # are collective: every process makes them).
    saved = hosts.from_process_0(lambda: identity.read(workdir), (identity.RunMismatchError, ValueError))
    if saved is not None:
      return saved
    meta = ckpts.restore_meta(step)
    return {"config": resolve.saved_config(None, meta).to_dict(), "from": f"checkpoint {directory / str(step)}"}, None
  finally:
    ckpts.close()


def _has_steps(directory: os.PathLike[str]) -> bool:
  """Whether a checkpoint folder holds a checkpoint step (a folder named by its step number)."""
  return any(p.name.isdigit() for p in directory.iterdir())


def _check_checkpoint_config(directory: os.PathLike[str], config, workdir: os.PathLike[str]) -> None:
  """Before anything is built: the config saved with the latest readable checkpoint must agree with `config` (which
  agrees with run.json): a hand-edited run.json is refused naming the field (`identity.check_checkpoint_config`).
  A step whose meta fails to read is skipped here; `_resume` reports it and moves it aside."""
  with ckpt_lib.Checkpoints(directory, read_only=True) as ckpts:
    for step in sorted(ckpts.all_steps(), reverse=True):
      try:
        meta = ckpts.restore_meta(step)
      except Exception as e:  # pylint: disable=broad-except
        if runs.damage(ckpts.directory / str(step), e, ckpts.directory) is None:
          raise
        continue
      if "config" in meta:
        identity.check_checkpoint_config(meta["config"], config, ckpts.directory / str(step),
                                         rundir.path(workdir) / identity.RUN_FILE)
      return


def _check_identity(run: Run, saved: tuple[dict[str, Any], dict[str, Any] | None] | None) -> dict[str, Any]:
  """Checks the dataset and the split against the saved identity (refusing a changed one), and writes run.json and
  split.json at a fresh start (process 0). Returns the run's identity record."""
  ds = identity.check_saved_dataset(saved, run.data, run.workdir)
  split = identity.split_record(run.config, run.data.names, run.data.indices)
  if saved is not None:
    run_rec, split_rec = saved
    if split_rec is not None and any(split_rec[k] != split[k] for k in ("train", "val", "test")):
      raise identity.RunMismatchError(f"{run.workdir}: the split computed now is not the one in "
                                      f"{run.workdir / identity.SPLIT_FILE}; nothing was changed")
    if "dataset" in run_rec and split_rec is not None:
      return run_rec
  record = {"format": identity.FORMAT, "config": identity.config_dict(run.config), "dataset": ds,
            "split": {k: split[k] for k in ("protocol", "split_seed", "train_fraction", "val_fraction")} |
                     {f"num_{k}": len(split[k]) for k in ("train", "val", "test")},
            "backbone": {"source": run.bundle.source, "fingerprint": run.bundle.fingerprint,
                         "family": getattr(run.bundle.config, "family", "clip")},
            "init_from": None}
  if run.config.init_from:
    record["init_from"] = restore.init_from_source(run.config)
  if jax.process_index() == 0:
    identity.write(run.workdir, record, split)
  mesh_lib.sync("run identity written")  # no path in the name: each host may mount the run folder elsewhere
  return record


def _resume(run: Run, ckpts: ckpt_lib.Checkpoints, state: dict[str, Any], shardings: dict[str, Any]
            ) -> tuple[int, dict[str, Any]]:
  """The latest step that restores, and the state restored from it (a damaged newer step is moved aside:
  `Checkpoints.restore_good`). Each candidate's meta must name this run's backbone and config (run.json)."""
  def check_meta(step: int, meta: dict[str, Any]) -> None:
    where = ckpts.directory / str(step)
    runs.check_backbone(meta, run.bundle.source, run.bundle.fingerprint, where)
    if "config" in meta:
      identity.check_checkpoint_config(meta["config"], run.config, where, run.workdir / identity.RUN_FILE)

  try:
    return ckpts.restore_good(state, run.mask, shardings, check_meta)
  except ValueError as e:
    if runs.SHAPE_MISMATCH not in str(e) or isinstance(e, runs.DamagedCheckpointError):
      raise
    raise identity.RunMismatchError(
        f"{ckpts.directory}: the checkpoint's parameters do not fit the model of {run.workdir / identity.RUN_FILE} "
        f"(a config mismatch: a model field differs from the one the run was trained with): "
        f"{' '.join(str(e).split(' [tensorstore_spec=')[0].split())[:300]}") from e


def train_and_evaluate(config, workdir: str | os.PathLike[str]) -> dict[str, Any]:
  """Trains (resuming from the workdir's latest checkpoint if any), then evaluates the test split.

  A restart must use the config the run started with, up to the fields that do not change what is computed
  (identity.OBSERVE): anything else is refused (identity.RunMismatchError) before the workdir is touched.
  `workdir`: a local folder or gs://bucket/path (`mcpf_jax.rundir`); the checkpoints go to config.checkpoint_dir
  when set. Returns the final summary (also written to <workdir>/train_summary.json).
  """
  workdir = rundir.path(workdir)
  config = resolve.resolve(config)  # before anything else: run.json holds the batch sizes fitted to the mesh
  checkpoint_dir = rundir.checkpoint_dir(workdir, config.get("checkpoint_dir"))
  hosts.check_run_folder(workdir)  # multi-host: one folder for every process, or refused before anything is written
  hosts.check_checkpoint_folder(workdir, checkpoint_dir)
  saved = _saved_identity(workdir, checkpoint_dir)
  if saved is not None:
    for key, old, new in identity.compare(saved[0]["config"], config, workdir):
      log.info("restart with %s changed: %s -> %s (does not change what is computed)", key, old, new)
    _check_checkpoint_config(checkpoint_dir, config, workdir)
  run = build_run(config, workdir)
  cfg, workdir = run.config, run.workdir
  _check_identity(run, saved)
  train_idx = run.data.indices["train"]
  steps_per_epoch = len(train_idx) // cfg.train.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"{run.data.name}: {len(train_idx)} training images is fewer than one batch of "
                     f"{cfg.train.batch_size}")
  ocfg = resolve.optim_config(cfg, steps_per_epoch)
  total = ocfg.total_steps
  tx = optim.make_optimizer(ocfg, run.mask)
  state = step_lib.init_state(run.params, tx)
  train_step, eval_step, s_sh, _p_sh, b_sh = step_lib.jit_steps(cfg, run.model, run.mask, tx, run.params, state,
                                                                run.mesh)
  evaluate = Evaluator(cfg, run.data, run.image_size, eval_step, b_sh)  # validation and test
  # This process loads the rows its devices hold (its data shard), not the rows of its process index.
  shard = mesh_lib.data_shard(b_sh)
  state = jax.device_put(state, s_sh)

  ckpts = ckpt_lib.Checkpoints(checkpoint_dir, keep=cfg.train.keep)
  meta = run.meta()
  start = 0
  if ckpts.latest_step() is not None:
    start, state = _resume(run, ckpts, state, s_sh)
    log.info("resumed from %s/%d", ckpts.directory, start)
  elif cfg.init_from:
    params, where = restore.init_from(cfg, run.bundle, run.params, run.mask, run.mesh)
    state = dict(state, params=jax.device_put(params, s_sh["params"]))
    log.info("step 0 starts from the trainable weights of %s", where)
  # The input stream at step t is a function of t alone (one global order), so a resumed run, on any number of
  # processes or workers, continues exactly where the checkpoint is.
  cores = pipeline.host_cores()
  workers, threads = pipeline.input_sizes(cfg.data.num_workers, pipeline.AUTO, cores)
  log.info("input: %d worker processes x %d read threads (data.num_workers=%s, %d cores)", workers, threads,
           cfg.data.num_workers, cores)
  loader = pipeline.train_loader(run.data.source, train_idx, batch_size=cfg.train.batch_size,
                                 image_size=run.image_size, resize=cfg.data.resize, seed=cfg.seed,
                                 score_map=run.data.score_map, num_workers=workers, num_threads=threads,
                                 shard_index=shard.index, shard_count=shard.count, start_batch=start)
  # Batches reach the devices ahead of the step that needs them; the first one's rows are checked across processes.
  device_batches = mesh_lib.prefetch_to_device(mesh_lib.checked_first(loader, shard, "training input"), b_sh,
                                               size=cfg.data.prefetch_to_device, batch_size=cfg.train.batch_size)
  # The wait for each batch against the rest of the loop: a warning when the input cannot keep up with the steps.
  feed = feed_lib.Feed(device_batches, cfg.train.batch_size, workers, threads, cores)
  log.info("%s | %s on %s: %d train / %d val / %d test images, %d steps (%d per epoch), %d trainable of %d "
           "parameters", launch.topology(run.mesh), cfg.model.name, run.data.name, len(train_idx),
           len(run.data.indices["val"]), len(run.data.indices["test"]), total, steps_per_epoch,
           freeze.count(run.params, run.mask), freeze.count(run.params))

  writer = None
  if jax.process_index() == 0:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    # tensorboardX writes gs:// itself (google-cloud-storage, each flush uploads the event file whole).
    writer = SummaryWriter(str(workdir / rundir.TENSORBOARD))
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
    message = (f"stopped {stop.reason} {where}; saved step {step} in {ckpts.directory}. Run the same command "
               "again to resume from it")
    log.warning("%s", message)
    return preemption.Stopped(message, stop.status)

  stop = preemption.StopRequest().install()
  last_save = time.monotonic()
  try:
    for step in range(start, total):
      state, m = train_step(state, next(feed))
      done = step + 1
      if done == start + 1:
        feed.reset()  # the first step's wait is the input's start-up, its step the compilation
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
        feed.check(done)
      if done % cfg.train.checkpoint_every == 0 or done == total:
        check_finite()
        val_metrics = None
        if len(run.data.indices["val"]) >= 3:
          try:
            val, _ = evaluate(state["params"], "val", stop)
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
        feed.reset()
      elif log_now and _time_to_save(last_save, cfg.train.checkpoint_minutes):
        check_finite()
        save(done, None)  # time-based: not validated (the best checkpoint must not depend on the clock)
        last_save = time.monotonic()
        feed.reset()
    bar.close()
    ckpts.wait()
    test, rows = evaluate(state["params"], "test", stop)
  except preemption.Stopped:
    ckpts.close()
    raise
  finally:
    stop.uninstall()
  summary = {"step": int(total), "test": test, "val": last_val, "devices": jax.device_count(),
             "processes": jax.process_count(), "mesh": dict(run.mesh.shape), "checkpoints": ckpts.all_steps(),
             "best_step": ckpts.best_step()}
  if jax.process_index() == 0:
    rundir.write_json_atomic(workdir / rundir.SUMMARY_FILE, summary, indent=2)
    reports.write_predictions(workdir / rundir.TEST_PREDICTIONS_FILE, rows)
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
