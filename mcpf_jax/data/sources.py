"""Random-access reading of built datasets, without TensorFlow and without the builder classes.

`source(name, data_dir)` opens `<data_dir>/<name>[/<config>]/<version>` with `tfds.builder_from_directory` and
returns an `IqaSource`: `len()`, `src[i]` -> one record as a dict of Python / NumPy values, plus the per-record
columns (`names`, `content_ids`, `mos`, `official_split`) read from the metadata, so splitting and MOS statistics
never touch the image bytes. It pickles as its paths (grain worker processes reopen the files). `data_dir` is a local
folder or a bucket (`gs://bucket/path`, through etils.epath; array_record reads gs:// itself).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mcpf_jax import rundir
from mcpf_jax.data import builders, registry

_TEXT_KEYS = ("name", "content_id", "official_split")


def dataset_dir(name: str, data_dir: str | os.PathLike[str], config: str | None = None,
                version: str | None = None) -> epath.Path:
  """`<data_dir>/<name>[/<config>]/<version>` (the newest built version when version is None)."""
  base = rundir.path(data_dir) / name
  if config:
    base = base / config
  if version is None:
    versions = sorted((p for p in base.glob("*.*.*") if (p / "dataset_info.json").exists()),
                      key=lambda p: tuple(int(x) if x.isdigit() else 0 for x in p.name.split(".")))
    if not versions:
      what = f"{name}/{config}" if config else name
      raise FileNotFoundError(f"dataset {what} is not built in {rundir.path(data_dir)} (no "
                              f"{base}/<version>/dataset_info.json); build it with `python -m mcpf_jax.data.prepare "
                              f"{name} --manual_dir <release folder> --data_dir {data_dir}`")
    return versions[-1]
  path = base / version
  if not (path / "dataset_info.json").exists():
    raise FileNotFoundError(f"no built dataset at {path}")
  return path


class IqaSource:
  """Random access to one built dataset (or a subset of its records).

  Attributes:
    path: the built dataset's folder (<data_dir>/<name>/<version>).
    metadata: dataset-level metadata (see builders and collect.collect), without the per-record index.
    indices: int64 [n] record positions this source shows (all records for split="all").
  """

  def __init__(self, path: str | os.PathLike[str], indices: Sequence[int] | np.ndarray | None = None):
    self.path = rundir.path(path)
    self._source = None
    with builders.quiet_tfds():
      builder = tfds.builder_from_directory(self.path)
    meta = dict(builder.info.metadata or {})
    self._index = {k: np.asarray(v) for k, v in meta.pop("index", {}).items()}
    self.metadata = meta
    total = builder.info.splits[builders.SPLIT].num_examples
    if self._index and len(self._index["name"]) != total:
      raise ValueError(f"{self.path}: metadata index has {len(self._index['name'])} entries but the records "
                       f"are {total}")
    self.indices = np.arange(total, dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
    if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= total):
      raise IndexError(f"{self.path}: indices outside 0..{total - 1}")
    self._builder = builder

  # Pickle as paths: array_record readers hold file handles; grain workers reopen them.
  def __getstate__(self) -> dict[str, Any]:
    return {"path": str(self.path), "indices": self.indices}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state["path"], state["indices"])

  def _records(self):
    if self._source is None:
      self._source = self._builder.as_data_source(builders.SPLIT)
    return self._source

  def __len__(self) -> int:
    return int(self.indices.size)

  def __getitem__(self, i: int) -> dict[str, Any]:
    n = len(self)
    if not -n <= i < n:
      raise IndexError(f"record {i} out of range for {n} records")
    return _convert(self._records()[int(self.indices[i])])

  def __getitems__(self, ids: Sequence[int]) -> list[dict[str, Any]]:
    return [_convert(r) for r in self._records().__getitems__([int(self.indices[i]) for i in ids])]

  def subset(self, indices: Sequence[int] | np.ndarray) -> IqaSource:
    """A source showing records `indices` of this one (positions relative to this source)."""
    sub = object.__new__(IqaSource)
    sub.__dict__.update(self.__dict__)
    sub._source = None
    sub.indices = self.indices[np.asarray(indices, np.int64)]
    return sub

  def _column(self, key: str) -> np.ndarray:
    if key not in self._index:
      raise KeyError(f"{self.path}: metadata has no per-record column {key!r}")
    return self._index[key][self.indices]

  @property
  def names(self) -> np.ndarray:
    """str [n]: relative file names."""
    return self._column("name")

  @property
  def content_ids(self) -> np.ndarray:
    """str [n]: content ids (what splits keep together)."""
    return self._column("content_id")

  @property
  def mos(self) -> np.ndarray:
    """float32 [n]: scores as given."""
    return self._column("mos").astype(np.float32)

  @property
  def official_split(self) -> np.ndarray:
    """str [n]: the release's split name per record ("" where none)."""
    return self._column("official_split")

  def __repr__(self) -> str:
    return f"IqaSource({self.metadata.get('dataset')!r}, {len(self)} records, path={str(self.path)!r})"


def _convert(record: dict[str, Any]) -> dict[str, Any]:
  out = dict(record)
  for k in _TEXT_KEYS:
    v = out[k]
    out[k] = v.decode("utf-8") if isinstance(v, bytes) else str(v)
  out["mos"] = np.float32(out["mos"])
  out["mos_std"] = np.float32(out["mos_std"])
  out["scene"] = np.asarray(out["scene"], np.bool_)
  for k in ("has_scene", "has_distortion"):
    out[k] = bool(out[k])
  out["distortion"] = np.int32(out["distortion"])
  out["distortion_fine"] = np.int32(out["distortion_fine"])
  out["index"] = np.int64(out["index"])
  return out


def source(name: str, data_dir: str | os.PathLike[str], part: str = "all", *, config: str | None = None,
           version: str | None = None) -> IqaSource:
  """Opens a built dataset for random access.

  Args:
    name: dataset name (e.g. "livec", "koniq10k", "csv").
    data_dir: the data_dir it was built into.
    part: "all", or a part of the release's official split (e.g. KonIQ's "training", "validation", "test").
    config: config name (for "csv": the name given at build time).
    version: dataset version (default: newest built).

  Returns:
    An IqaSource; records are dicts with image (bytes), name, mos, mos_std, content_id, official_split, scene,
    has_scene, distortion, distortion_fine, has_distortion, index.
  """
  if name == "csv" and not config:
    config = "default"
  src = IqaSource(dataset_dir(name, data_dir, config, version))
  if part == "all":
    return src
  official = src.official_split
  if part not in set(official.tolist()):
    have = sorted(set(official.tolist()) - {""})
    raise ValueError(f"dataset {name}: no part {part!r}; parts are 'all'" + (f" and the official split's {have}"
                     if have else " (the release defines no official split; use mcpf_jax.data.splits for seeded "
                     "splits)"))
  return src.subset(np.flatnonzero(official == part))


def builder(name: str, data_dir: str | os.PathLike[str] | None = None, **kwargs: Any) -> builders.IqaBuilder:
  """The TFDS builder of `name` (for building; reading goes through `source`).

  Args:
    name: one of NAMES.
    data_dir: where to write (tfds default ~/tensorflow_datasets when None).
    **kwargs: build options (skip_bad, report_path, liqe_dir, decode_check, num_threads; live: dmos; csv: the
      CsvConfig fields or config=CsvConfig(...)); file_format defaults to array_record.
  """
  if name not in builders.BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; known: {sorted(builders.BUILDERS)}")
  kwargs.setdefault("file_format", "array_record")
  with builders.quiet_tfds():
    return builders.BUILDERS[name](data_dir=None if data_dir is None else str(data_dir), **kwargs)


def info(name: str, data_dir: str | os.PathLike[str] | None = None, *, config: str | None = None) -> dict[str, Any]:
  """Dataset-level metadata: from the built dataset when data_dir holds it, else the layout's static facts.

  Keys (static): dataset, title, homepage, mos_kind, higher_is_better, mos_range, content_kind, official_split_names.
  Built datasets add mos_observed, num_examples, num_contents, official_splits, label_files, excluded, notes,
  liqe, skipped, problems, ... (see collect.collect); the per-record index is left out (use source()).
  """
  if data_dir is not None:
    try:
      path = dataset_dir(name, data_dir, config or ("default" if name == registry.CSV else None))
    except FileNotFoundError:
      path = None
    if path is not None:
      with builders.quiet_tfds():
        meta = dict(tfds.builder_from_directory(path).info.metadata or {})
      meta.pop("index", None)
      return meta
  if name not in registry.LAYOUTS:
    raise ValueError(f"no static metadata for {name!r} (known: {sorted(registry.LAYOUTS)}; 'csv' is described by "
                     "its config and known only once built)")
  lay = registry.LAYOUTS[name]()
  return {"dataset": lay.name, "title": lay.title, "homepage": lay.homepage, "mos_kind": lay.mos_kind,
          "higher_is_better": lay.higher_is_better, "mos_range": list(lay.mos_range) if lay.mos_range else None,
          "content_kind": lay.content_kind, "official_split_names": list(lay.official_splits)}
