"""From the config to a dataset source, its train/val/test split and its score map (scores.ScoreMap).

`data.name = "smoke"` is the built-in smoke data (scikit-image photos with synthetic distortions), written and
built through the generic csv builder on first use. Other datasets are read from `data.data_dir`; if one is not
built yet and `data.manual_dir` is set, it is built from that release folder first.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import jax
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mcpf_jax import data as datasets
from mcpf_jax import rundir, scores
from mcpf_jax.data import splits
from mcpf_jax.smoke import data as smoke
from mcpf_jax.train import mesh as mesh_lib

SMOKE = "smoke"


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


def _build(name: str, root: epath.Path, manual_dir: pathlib.Path, **kwargs: Any) -> None:
  root = _local(name, root)
  # Only process 0 writes; the others wait for it (multi-host runs share data_dir).
  if jax.process_index() == 0:
    datasets.builder(name, data_dir=root, **kwargs).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  mesh_lib.sync(f"built {name}")


def open_source(config, name: str, workdir: str | os.PathLike[str]) -> datasets.IqaSource:
  """The built dataset `name`, building it first where it can (smoke; or a dataset with data.manual_dir)."""
  root = data_dir(config, workdir)
  if name == SMOKE:
    try:
      return datasets.source("csv", root, config=SMOKE)
    except FileNotFoundError:
      raw = _local("csv", root) / "smoke_release"
      if jax.process_index() == 0:
        smoke.write_smoke_release(raw)  # whole or not at all: a concurrent start never reads half of it
      _build("csv", root, raw, config_name=SMOKE, **smoke.CSV_CONFIG)
      return datasets.source("csv", root, config=SMOKE)
  try:
    return datasets.source(name, root)
  except FileNotFoundError:
    if not config.data.manual_dir:
      raise
    _build(name, root, pathlib.Path(config.data.manual_dir).expanduser())
    return datasets.source(name, root)


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
