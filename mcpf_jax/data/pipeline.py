"""The input pipeline on grain: decode, resize, crop, targets, batching, per-shard input, worker processes.

A source is anything random-access (`len(source)`, `source[row]` -> a record dict with at least `image`, the
encoded file bytes, and `mos`; the other fields below are used where present). `train_loader` gives shuffled,
augmented batches that are a pure function of the seed and the step (any number of processes, workers and
threads); `eval_batches` gives every row once, multi-crop, the last batch padded with weight-0 rows. A "shard" is a
process's block of each global batch: its place on the mesh's data axis (`mcpf_jax.train.mesh.data_shard`), not
its process index. Worker and thread counts default from the host's cores (`input_sizes`).

Batches are dicts of numpy arrays (B = batch size, S = image_size, C = num_crops):
  image            uint8   [B, S, S, 3] (train) or [B, C, S, S, 3] (eval); normalisation happens on device
  mos              float32 [B]  the score as stored in the source (MOS or DMOS, unchanged)
  mos01            float32 [B]  scores.ScoreMap.mos01: higher is better, training range -> [0, 1]
  mos_std01        float32 [B]  the score's std on the mos01 scale; NaN where the source has none
  level            int32   [B]  quality level 0 (bad) .. num_levels - 1 (perfect), scores.ScoreMap.level
  scene            float32 [B, 9]  multi-hot scene labels (mcpf_jax.classes.SCENES); zeros where unknown
  has_scene        float32 [B]  1 where the record has scene labels, else 0 (a loss mask)
  distortion       int32   [B]  distortion class (mcpf_jax.classes.DISTORTIONS); 0 where unknown
  has_distortion   float32 [B]  1 where the record has a distortion label, else 0
  index            int64   [B]  the record's row in the source (-1 for eval padding)
  weight           float32 [B]  eval only: 1 for real rows, 0 for padding
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

from mcpf_jax import classes, images, scores

NUM_SCENES = len(classes.SCENES)
NUM_DISTORTIONS = len(classes.DISTORTIONS)

# num_workers / num_threads: sized from the host's cores (`input_sizes`).
AUTO = -1
# Worker processes start from this many cores (below it the main process decodes with threads), and at most this
# many (each holds the source and a copy of the pipeline).
_MIN_CORES_FOR_WORKERS = 4
_MAX_WORKERS = 32
# Decoded batches in flight per process: at least one per read thread (each thread decodes a whole batch), then as
# many as fit in this many bytes, at most _MAX_PREFETCH_BATCHES.
_PREFETCH_BYTES = 64 << 20
_MAX_PREFETCH_BATCHES = 8


def host_cores() -> int:
  """The CPU cores this process may run on (its affinity mask: what a scheduler such as Slurm gave the job), or
  `os.cpu_count()` where the platform has no affinity call."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS, Windows
    return os.cpu_count() or 1


def input_sizes(num_workers: int = AUTO, num_threads: int = AUTO, cores: int | None = None) -> tuple[int, int]:
  """(worker processes, read threads per process) for the given values, AUTO ones sized from the cores.

  Workers (AUTO): 0 below 4 cores, else min(cores - 1, 32). Threads (AUTO): `cores` when the main process decodes
  (0 workers), else 1 per worker process.

  Args:
    num_workers: grain worker processes, or AUTO.
    num_threads: read threads per process, or AUTO.
    cores: the host's cores (default: `host_cores()`).

  Raises:
    ValueError: a value below AUTO (-1).
  """
  for name, value in (("num_workers", num_workers), ("num_threads", num_threads)):
    if value < AUTO:
      raise ValueError(f"{name} must be >= 0, or {AUTO} to size it from the host's cores; got {value}")
  cores = host_cores() if cores is None else cores
  if num_workers == AUTO:
    num_workers = 0 if cores < _MIN_CORES_FOR_WORKERS else min(cores - 1, _MAX_WORKERS)
  if num_threads == AUTO:
    num_threads = 1 if num_workers else max(1, cores)
  return num_workers, num_threads


def prefetch_batches(batch_bytes: int, num_threads: int) -> int:
  """Batches each process decodes ahead: one per read thread at least, then up to 64 MiB, at most 8."""
  return max(num_threads, 1, min(_MAX_PREFETCH_BATCHES, _PREFETCH_BYTES // max(batch_bytes, 1)))



class RecordError(ValueError):
  """A source record that the pipeline cannot turn into an example; names the row and the image."""

  def __init__(self, row: int, name: str, reason: str):
    self.row, self.name, self.reason = row, name, reason
    super().__init__(f"row {row} ({name}): {reason}")

  def __reduce__(self):
    # Worker processes send exceptions to the main process by pickling them.
    return (RecordError, (self.row, self.name, self.reason))


# ---------------------------------------------------------------------------------------------------------------
# Labels.




# ---------------------------------------------------------------------------------------------------------------
# Per-record transformations (module-level dataclasses: pickled into grain's worker processes).


class _Rows:
  """A grain source over chosen rows of a source: element i = (rows[i], source[rows[i]]); row -1 = padding."""

  def __init__(self, source: Any, rows: np.ndarray):
    self.source = source
    self.rows = np.asarray(rows, np.int64)

  def __len__(self) -> int:
    return int(self.rows.size)

  def __getitem__(self, i: int) -> tuple[int, Any]:
    row = int(self.rows[i])
    return row, (None if row < 0 else self.source[row])


def _name(record: Any, row: int) -> str:
  if isinstance(record, dict) and record.get("name") is not None:
    return str(record["name"])
  return f"<unnamed row {row}>"


def _targets(record: dict[str, Any], row: int, score_map: scores.ScoreMap) -> dict[str, np.ndarray]:
  """The label part of one example (scalars and [9] scenes)."""
  mos = np.float32(record["mos"])
  if not np.isfinite(mos):
    raise ValueError(f"mos is {mos}")
  mos_std = np.float32(record.get("mos_std", np.nan))
  scene = record.get("scene")
  has_scene = bool(record.get("has_scene", scene is not None)) and scene is not None
  if has_scene:
    scene = np.asarray(scene, np.float32).reshape(-1)
    if scene.shape != (NUM_SCENES,):
      raise ValueError(f"scene has shape {list(scene.shape)}, expected [{NUM_SCENES}]")
  else:
    scene = np.zeros(NUM_SCENES, np.float32)
  distortion = record.get("distortion")
  has_distortion = bool(record.get("has_distortion", distortion is not None)) and distortion is not None
  distortion = int(distortion) if has_distortion else 0
  if not 0 <= distortion < NUM_DISTORTIONS:
    raise ValueError(f"distortion {distortion} is outside 0..{NUM_DISTORTIONS - 1}")
  return {
      "mos": mos,
      "mos01": score_map.mos01(mos),
      "mos_std01": score_map.mos_std01(mos_std),
      "level": score_map.level(mos),
      "scene": scene,
      "has_scene": np.float32(has_scene),
      "distortion": np.int32(distortion),
      "has_distortion": np.float32(has_distortion),
      "index": np.int64(row),
  }


def _decoded(record: dict[str, Any], name: str, resize: int, max_upscale: float | None) -> np.ndarray:
  """uint8 [h, w, 3] with min(h, w) == resize (a large JPEG decoded at a reduced DCT scale: `images.decode`).

  A refused image is advised in the terms of a training run (train.py / eval.py cannot pass max_upscale=None): the
  short side comes from `data.resize`, and the image can be dropped from the dataset.
  """
  try:
    return images.decode(record["image"], name, short_side=resize, max_upscale=max_upscale)
  except images.LimitError as e:
    if e.option != "max_upscale":
      raise
    raise images.LimitError(e.name, e.width, e.height, e.option, e.limit, e.needed, e.facts,
                            "the pipelines' bound on upscaling; use a smaller --config.data.resize, or build the "
                            "dataset without this image") from e


@dataclasses.dataclass(frozen=True)
class _TrainExample(grain.transforms.RandomMap):
  """(row, record) -> one training example with a random crop and flip."""
  score_map: scores.ScoreMap
  image_size: int
  resize: int
  max_upscale: float | None

  def random_map(self, element: tuple[int, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    row, record = element
    name = _name(record, row)
    try:
      img = _decoded(record, name, self.resize, self.max_upscale)
      h, w = img.shape[:2]
      top = int(rng.integers(0, h - self.image_size + 1))
      left = int(rng.integers(0, w - self.image_size + 1))
      flip = bool(rng.random() < 0.5)
      crop = images.crop(img, top, left, self.image_size)
      if flip:
        crop = crop[:, ::-1]
      example = _targets(record, row, self.score_map)
    except Exception as e:  # every failure names the row and the file: never a silent drop
      raise RecordError(row, name, f"{type(e).__name__}: {e}") from e
    example["image"] = np.ascontiguousarray(crop)
    return example


@dataclasses.dataclass(frozen=True)
class _EvalExample(grain.transforms.Map):
  """(row, record) -> one evaluation example with `num_crops` grid crops; row -1 -> a zero padding example."""
  score_map: scores.ScoreMap
  image_size: int
  resize: int
  num_crops: int
  max_upscale: float | None

  def map(self, element: tuple[int, Any]) -> dict[str, np.ndarray]:
    row, record = element
    s = self.image_size
    if row < 0:
      return {
          "image": np.zeros((self.num_crops, s, s, 3), np.uint8),
          "mos": np.float32(0), "mos01": np.float32(0), "mos_std01": np.float32(0), "level": np.int32(0),
          "scene": np.zeros(NUM_SCENES, np.float32), "has_scene": np.float32(0), "distortion": np.int32(0),
          "has_distortion": np.float32(0), "index": np.int64(-1), "weight": np.float32(0),
      }
    name = _name(record, row)
    try:
      crops, _ = images.eval_crops(record["image"], name, resize=self.resize, image_size=s,
                                   num_crops=self.num_crops, max_upscale=self.max_upscale)
      example = _targets(record, row, self.score_map)
    except Exception as e:
      raise RecordError(row, name, f"{type(e).__name__}: {e}") from e
    example["image"] = crops
    example["weight"] = np.float32(1)
    return example


# ---------------------------------------------------------------------------------------------------------------
# Loaders.


def _check_rows(source: Any, indices: Sequence[int] | np.ndarray) -> np.ndarray:
  rows = np.asarray(indices, np.int64).reshape(-1)
  n = len(source)
  if rows.size and (rows.min() < 0 or rows.max() >= n):
    raise IndexError(f"indices must be rows 0..{n - 1} of the source, got [{rows.min()}, {rows.max()}]")
  return rows


def _check_sizes(image_size: int, resize: int, batch_size: int) -> None:
  if batch_size < 1:
    raise ValueError(f"batch_size must be at least 1, got {batch_size}")
  if resize < image_size:
    raise ValueError(f"resize ({resize}) must be at least image_size ({image_size}): the short side is resized "
                     "to `resize`, then cropped to `image_size`")


def _check_shard(shard_index: int, shard_count: int) -> None:
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(f"need 0 <= shard_index < shard_count, got shard_index={shard_index}, "
                     f"shard_count={shard_count}")


class _ProcessRows(grain.MapDataset):
  """One shard of a stream of GLOBAL batches: rows [s * k, (s + 1) * k) of each one (k = B / shard_count).

  `parent` is the global, per-epoch shuffled and augmented example sequence (epoch e's examples at parent positions
  e * num_rows + 0..num_rows - 1); global batch i of epoch e holds parent positions e * num_rows + b * B + 0..B - 1
  for b = i mod steps_per_epoch, exactly the positions grain's `batch(B, drop_remainder=True)` gives it. Element n of
  this dataset is position o = n mod k of this shard's part of global batch n // k. Positions past one epoch
  wrap into the next one, as grain's batch and repeat do, so `batch(k).repeat()` on top continues across epochs.
  """

  def __init__(self, parent: grain.MapDataset, num_rows: int, global_batch: int, shard_index: int,
               shard_count: int):
    super().__init__(parent)
    self._num_rows, self._global_batch = num_rows, global_batch
    self._local = global_batch // shard_count
    self._offset = shard_index * self._local
    self._steps = num_rows // global_batch

  def __len__(self) -> int:
    return self._steps * self._local

  def __str__(self) -> str:
    return f"_ProcessRows(offset={self._offset}, local={self._local}, global_batch={self._global_batch})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    step, o = divmod(int(index), self._local)
    epoch, b = divmod(step, self._steps)
    return self._parent[epoch * self._num_rows + b * self._global_batch + self._offset + o]


def steps_per_epoch(num_rows: int, batch_size: int) -> int:
  """Training steps per epoch: num_rows // batch_size global batches (the remainder dropped), on any number of
  processes and shards."""
  return num_rows // batch_size


def num_eval_batches(num_rows: int, batch_size: int, shard_count: int = 1) -> int:
  """Evaluation batches per shard: ceil(ceil(num_rows / shard_count) / batch_size) (the last one padded)."""
  per_shard = -(-num_rows // shard_count)
  return -(-per_shard // batch_size)


def _read_options(num_threads: int, batch_bytes: int) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches(batch_bytes, num_threads))


def _own_arrays(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: np.array(v) for k, v in batch.items()}


def _default_unparsed_grain_flag(name: str) -> None:
  """Lets grain read its absl flag `name` at its default value when the program never parsed absl flags.

  grain 0.2.18 reads `--grain_enable_multiprocess_worker_profiling` when it starts worker processes, which raises
  `UnparsedFlagAccessError` in programs that do not go through `absl.app` (google/grain#1355, fixed upstream in
  #1362 by falling back to the default). Marking just that flag present keeps its default value (grain does the
  same for its debug flags in its workers); a later `FLAGS(argv)` still parses it from the command line.
  """
  if not flags.FLAGS.is_parsed() and name in flags.FLAGS and not flags.FLAGS[name].present:
    flags.FLAGS[name].present = True


def _with_workers(ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
  if num_workers == 0:
    return ds
  _default_unparsed_grain_flag("grain_enable_multiprocess_worker_profiling")
  ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=1))
  # Workers hand batches over in shared memory blocks that live as long as the arrays; copying them into
  # ordinary arrays releases each block at once (and leaves none behind at interpreter exit).
  return ds.map(_own_arrays)


def train_loader(source: Any, indices: Sequence[int] | np.ndarray, *, batch_size: int, image_size: int = 224,
                 resize: int = 512, seed: int, score_map: scores.ScoreMap, num_workers: int = 0, shard_index: int = 0,
                 shard_count: int = 1, num_epochs: int | None = None, start_batch: int = 0, num_threads: int = 1,
                 max_upscale: float | None = images.DEFAULT_MAX_UPSCALE) -> grain.IterDataset:
  """Shuffled, augmented training batches: this process's rows of each GLOBAL batch, epoch after epoch.

  Each image is decoded, its short side resized to `resize` (aspect kept; upscaling past `max_upscale` is refused
  naming the file), then randomly cropped to `image_size` and flipped. One global order, seeded by `seed` alone:
  each epoch visits the rows once, its last partial global batch dropped (`steps_per_epoch`). Shard s of S yields
  rows [s * B / S, (s + 1) * B / S) of each global batch; crops and flips come from grain's per-element generators
  (seed, global position, epoch). So the stream at step t is a pure function of t (`start_batch`): 1 and P
  processes see the same global batches, and a run resumes exactly from its step on any number of workers.

  Args:
    source: random-access source (`len`, `source[row]` -> record dict with `image` bytes and `mos`, ...).
    indices: rows of `source` to train on (e.g. a split's training rows).
    batch_size: the GLOBAL batch B (examples per step over all processes); divisible by shard_count.
    image_size: crop side S.
    resize: short side after resizing, before cropping (>= image_size).
    seed: seeds the order, the crops and the flips.
    score_map: the scores.ScoreMap fitted on the training rows.
    num_workers: grain worker processes decoding in parallel (0: in this process; AUTO: from the host's cores,
      `input_sizes`). Batches do not depend on it.
    shard_index, shard_count: this process's block of every global batch (mcpf_jax.train.mesh.data_shard), not
      its process index: processes that hold the same rows pass the same shard_index.
    num_epochs: stop after this many epochs (None: repeat forever).
    start_batch: the first global batch to yield (a resumed run's step).
    num_threads: read threads per process (grain ReadOptions.num_threads; AUTO: `input_sizes`). Each decodes a
      whole batch; the batches come out in order whatever the count.
    max_upscale: refuse images needing more than this upscale factor to reach `resize` (None: any).

  Returns:
    A grain IterDataset of batch dicts of B / shard_count examples (see the module docstring).
  """
  _check_sizes(image_size, resize, batch_size)
  _check_shard(shard_index, shard_count)
  if batch_size % shard_count:
    raise ValueError(f"the global batch_size {batch_size} must be divisible by the number of data shards "
                     f"(shard_count={shard_count})")
  if start_batch < 0:
    raise ValueError(f"start_batch must be >= 0, got {start_batch}")
  num_workers, num_threads = input_sizes(num_workers, num_threads)
  rows = _check_rows(source, indices)
  # A seeded permutation before grain's shuffle: the order of runs of earlier versions (same batches, same numbers).
  rows = rows[np.random.default_rng([seed, 0x5EED]).permutation(rows.size)]
  if rows.size < batch_size:
    raise ValueError(f"{rows.size} training rows are fewer than batch_size {batch_size}: no full batch to train on")
  # Distinct seeds for the order and for the augmentation; grain folds in the epoch for both.
  order_seed, augment_seed = np.random.SeedSequence([seed, 1]).generate_state(2).tolist()
  ds = grain.MapDataset.source(_Rows(source, rows))
  ds = ds.shuffle(seed=order_seed)
  ds = ds.random_map(_TrainExample(score_map, image_size, resize, max_upscale), seed=augment_seed)
  ds = _ProcessRows(ds, rows.size, batch_size, shard_index, shard_count)
  ds = ds.batch(batch_size // shard_count, drop_remainder=True)
  ds = ds.repeat(num_epochs)
  if start_batch:
    ds = ds[start_batch:]
  batch_bytes = batch_size // shard_count * image_size * image_size * 3
  return _with_workers(ds.to_iter_dataset(_read_options(num_threads, batch_bytes)), num_workers)


def eval_batches(source: Any, indices: Sequence[int] | np.ndarray, *, batch_size: int, image_size: int = 224,
                 resize: int = 512, num_crops: int = 15, score_map: scores.ScoreMap, num_workers: int = 0,
                 shard_index: int = 0, shard_count: int = 1, num_threads: int = 1,
                 max_upscale: float | None = images.DEFAULT_MAX_UPSCALE) -> grain.IterDataset:
  """Every row once, in order, as multi-crop batches; the last batch padded to `batch_size` (weight 0).

  With shard_count > 1 each shard gets rows[shard_index::shard_count], padded so that every shard yields
  `num_eval_batches(len(indices), batch_size, shard_count)` batches; `batch_size` is the shard's part of a global
  batch (global batch / shard_count).

  Args:
    source, indices, image_size, resize, score_map, num_workers, shard_index, shard_count, num_threads,
      max_upscale: as in `train_loader`.
    batch_size: images per batch (each with `num_crops` crops).
    num_crops: crops per image, on the grid of `images.grid_crop_positions`.

  Returns:
    A grain IterDataset of batch dicts with `image` uint8 [B, num_crops, S, S, 3] and `weight` float32 [B].
  """
  _check_sizes(image_size, resize, batch_size)
  _check_shard(shard_index, shard_count)
  if num_crops < 1:
    raise ValueError(f"num_crops must be at least 1, got {num_crops}")
  num_workers, num_threads = input_sizes(num_workers, num_threads)
  all_rows = _check_rows(source, indices)
  rows = all_rows[shard_index::shard_count]
  total = num_eval_batches(all_rows.size, batch_size, shard_count) * batch_size
  rows = np.concatenate([rows, np.full(total - rows.size, -1, np.int64)])
  ds = grain.MapDataset.source(_Rows(source, rows))
  ds = ds.map(_EvalExample(score_map, image_size, resize, num_crops, max_upscale))
  ds = ds.batch(batch_size, drop_remainder=False)
  batch_bytes = batch_size * num_crops * image_size * image_size * 3
  return _with_workers(ds.to_iter_dataset(_read_options(num_threads, batch_bytes)), num_workers)
