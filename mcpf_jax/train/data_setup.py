"""From the config to a dataset source, its train/val/test split and its score map (scores.ScoreMap).

A generated dataset (`mcpf_jax.data.GENERATED`, registered by a module of config.plugins) is written and built
through the generic csv builder on first use. Other datasets are read from `data.data_dir`; if one
is not built yet and `data.manual_dir` is set, it is built from that release folder first.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mcpf_jax import data as datasets
from mcpf_jax import rundir, scores
from mcpf_jax.data import splits
from mcpf_jax.train import hosts, identity
from mcpf_jax.train import mesh as mesh_lib


@dataclasses.dataclass
class RunData:
  """The dataset as one run uses it: its source, the record positions of each part of its split
  (`indices["train"|"val"|"test"|"all"]`), and the score map fitted on the training part."""
  name: str
  source: datasets.IqaSource
  indices: dict[str, np.ndarray]
  higher_is_better: bool
  score_map: scores.ScoreMap

  @property
  def mos(self) -> np.ndarray:
    return self.source.mos.astype(np.float64)

  @property
  def names(self) -> np.ndarray:
    return self.source.names


def data_dir(config, workdir: str | os.PathLike[str]) -> epath.Path:
  """config.data.data_dir (a local folder or gs://bucket/path), or when it is empty <workdir>/data (self-contained
  runs such as smoke); for a run kept in a bucket, the local cache's data/ (`rundir.data_dir`)."""
  return rundir.data_dir(workdir, config.data.data_dir)


def _local(name: str, root: epath.Path) -> pathlib.Path:
  """`root` as the local folder dataset `name` is built into; a bucket is refused (datasets are read from one)."""
  if rundir.is_remote(root):
    raise FileNotFoundError(f"data.data_dir={root}: dataset {name} is not built there, and datasets are built into a "
                            "local folder (python -m mcpf_jax.data.prepare ... --data_dir LOCAL_DIR); copy the built "
                            f"folder to the bucket (gcloud storage cp -r LOCAL_DIR/{name} {root}/) or point "
                            "data.data_dir at the local one")
  return pathlib.Path(os.fspath(root))


# What identifies a dataset build across hosts (identity.dataset_identity's fields, its path aside).
SAME_BUILD = ("name", "version", "num_records", "fingerprint", "stored_short_side")


def _source(builder: str, root: epath.Path, **kwargs: Any) -> datasets.IqaSource | None:
  try:
    return datasets.source(builder, root, **kwargs)
  except FileNotFoundError:
    return None


def _build(name: str, root: epath.Path, manual_dir: pathlib.Path, missing: bool,
           write_release: Callable[[], None] | None = None, **kwargs: Any) -> None:
  """Builds dataset `name` into `root`: in a multi-host job once per distinct folder (the lowest process that sees
  it builds; hosts with their own disks each build their own copy), the others waiting. `missing`: whether this
  process's copy is missing (a copy already there is kept)."""
  root = _local(name, root)
  group = hosts.leaders(root, "data_dir")
  if group[jax.process_index()] == jax.process_index() and missing:
    if write_release is not None:
      write_release()
    datasets.builder(name, data_dir=root, **kwargs).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  mesh_lib.sync(f"built {name}")


def open_source(config, name: str, workdir: str | os.PathLike[str]) -> datasets.IqaSource:
  """The built dataset `name`, building it first where it can (a generated one; or one with data.manual_dir).

  Multi-host: each process reads the copy in its own data_dir (one shared folder, a bucket, or each host's own
  disk); a copy missing on any host is built there (once per folder), and the processes must read the same build
  (hosts.check_same on its identity)."""
  root = data_dir(config, workdir)
  generated = datasets.GENERATED.get(name)
  if generated is None and name not in datasets.NAMES:
    raise ValueError(f"data.name={name!r}: not a dataset of mcpf_jax.data {list(datasets.NAMES)} nor a generated one "
                     f"(registered: {sorted(datasets.GENERATED)}; config.plugins="
                     f"{list(config.get('plugins', ()))} lists the modules that register them)")
  builder, kwargs = (datasets.CSV, {"config": name}) if generated else (name, {})
  src = _source(builder, root, **kwargs)
  missing_on = [i for i, m in enumerate(hosts.allgather_json(src is None)) if m]
  if missing_on:
    if generated is not None:
      raw = _local(builder, root) / f"{name}_release"
      _build(builder, root, raw, src is None, lambda: generated.write_release(raw), config_name=name,
             **generated.csv)
    elif config.data.manual_dir:
      _build(name, root, pathlib.Path(config.data.manual_dir).expanduser(), src is None)
    elif jax.process_count() == 1:
      datasets.source(builder, root, **kwargs)  # raises its own FileNotFoundError, naming what is missing
    else:
      raise FileNotFoundError(f"data.data_dir={root}: dataset {name} is not built there on process(es) "
                              f"{', '.join(map(str, missing_on))}, and data.manual_dir is not set to build it; "
                              "build it on each host (python -m mcpf_jax.data.prepare ...) or point data.data_dir at "
                              "a folder or bucket every host reads")
    src = datasets.source(builder, root, **kwargs)
  if jax.process_count() > 1:
    hosts.check_same(identity.dataset_identity(src, name), SAME_BUILD, f"dataset {name}")
  return src


def check_stored_size(src: datasets.IqaSource, config, name: str) -> None:
  """A dataset prepared with `--resize S` stores its images at short side S: only data.resize == S may read it."""
  stored = src.metadata.get("resize")
  if stored and int(stored) != int(config.data.resize):
    raise ValueError(f"{src.path}: dataset {name} was prepared with its images stored at a short side of {stored} "
                     f"(prepare --resize {stored}), but data.resize={config.data.resize}; set "
                     f"--config.data.resize={stored}, or use a build without --resize (or with --resize "
                     f"{config.data.resize})")


def load(config, workdir: str | os.PathLike[str], *, dataset: str | None = None) -> RunData:
  """The configured dataset and its split; `dataset` (cross-dataset evaluation) is used whole, as "all"."""
  name = dataset or config.data.name
  src = open_source(config, name, workdir)
  check_stored_size(src, config, name)
  higher = bool(src.metadata.get("higher_is_better", True))
  n = len(src)
  indices = {"all": np.arange(n, dtype=np.int64)}
  if dataset is None:
    if config.data.split_protocol == "official":
      official = splits.official_split_indices(src.official_split)
      if not official:
        raise ValueError(f"data.split_protocol='official': dataset {name} has no official split; use "
                         "data.split_protocol='seed'")
      indices["train"] = official.get("training", official.get("train"))
      indices["val"] = official.get("validation", np.zeros((0,), np.int64))
      indices["test"] = official["test"]
    elif config.data.split_protocol == "seed":
      train, test = splits.split_indices(src.content_ids, config.data.split_seed, config.data.train_fraction)
      val = np.zeros((0,), np.int64)
      if config.data.val_fraction > 0:
        train, val = splits.validation_split(src.content_ids, train, config.data.split_seed, config.data.val_fraction)
      indices.update(train=train, val=val, test=test)
      splits.check_disjoint(src.content_ids, train, val, test)
    else:
      raise ValueError(f"data.split_protocol={config.data.split_protocol!r}: expected 'seed' or 'official'")
    fit_on = indices["train"]
  else:
    fit_on = indices["all"]
  score_map = scores.ScoreMap.fit(src.mos[fit_on], higher_is_better=higher)
  return RunData(name, src, indices, higher, score_map)
