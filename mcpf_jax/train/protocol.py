"""The papers' protocol: train and evaluate on N seeded splits (seeds 0..N-1), report the median and spread."""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np

from mcpf_jax import rundir
from mcpf_jax.train import identity, trainer
from mcpf_jax.train import mesh as mesh_lib

log = logging.getLogger("mcpf_jax")
_KEYS = ("srcc", "plcc", "plcc_logistic", "krcc", "rmse")


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
  """Median, mean, std, min, max and quartiles of each metric over splits."""
  out = {}
  for k in _KEYS:
    v = np.asarray([r[k] for r in results], np.float64)
    out[k] = {"median": float(np.median(v)), "mean": float(np.mean(v)), "std": float(np.std(v)),
              "min": float(np.min(v)), "max": float(np.max(v)),
              "q25": float(np.percentile(v, 25)), "q75": float(np.percentile(v, 75)), "values": v.tolist()}
  return out


def train_splits(config, workdir: str | os.PathLike[str]) -> dict[str, Any]:
  """Trains split s in <workdir>/split_<s> for s in 0..config.num_splits-1 (each resumable), then summarizes.

  Writes <workdir>/protocol.json: the summary, each split's test metrics ("per_split"), and each split's seed,
  workdir and split file ("runs"); process 0 writes it, whole, and the others wait for it.
  """
  workdir = rundir.path(workdir)
  results, split_runs = [], []
  for s in range(config.num_splits):
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.num_splits = 1
      cfg.data.split_seed = s
      if cfg.get("checkpoint_dir"):  # each split's checkpoints apart, as its run folder
        cfg.checkpoint_dir = str(rundir.path(cfg.checkpoint_dir) / f"split_{s}")
    summary = trainer.train_and_evaluate(cfg, workdir / f"split_{s}")
    results.append(summary["test"])
    split_runs.append({"split": s, "split_seed": s, "workdir": f"split_{s}",
                 "split_file": f"split_{s}/{identity.SPLIT_FILE}", "run_file": f"split_{s}/{identity.RUN_FILE}",
                 "num_test": summary["test"]["num_images"]})
    log.info("split %d: test SRCC %.4f PLCC %.4f", s, summary["test"]["srcc"], summary["test"]["plcc"])
  out = {"dataset": config.data.name, "model": config.model.name, "num_splits": config.num_splits,
         "summary": summarize(results), "per_split": results,
         # Each split's seed and where its train/val/test images are listed by name (audit: eval.py --workdir
         # <workdir>/split_<s> evaluates exactly those test images).
         "runs": split_runs}
  if jax.process_index() == 0:
    if not rundir.is_remote(workdir):
      workdir.mkdir(parents=True, exist_ok=True)
    rundir.write_json_atomic(workdir / rundir.PROTOCOL_FILE, out, indent=2)
  mesh_lib.sync("protocol summary written")
  s = out["summary"]
  log.info("%d splits of %s: median SRCC %.4f (IQR %.4f-%.4f), median PLCC %.4f", config.num_splits, config.data.name,
           s["srcc"]["median"], s["srcc"]["q25"], s["srcc"]["q75"], s["plcc"]["median"])
  return out
