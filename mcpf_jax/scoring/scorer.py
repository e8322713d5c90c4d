"""The streaming scorer: a `LoadedModel` run on image files and arrays, in fixed-shape batches, decoding ahead.

Every image is scored alone: batches have a fixed shape (the last one padded with zero images that are thrown
away), so an image's score does not depend on what else is in its batch. A file that cannot be read or decoded
gets a `Result` with `error` set and no score; the others are still scored.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mcpf_jax import images, scores
from mcpf_jax import model as iqa
from mcpf_jax.clip import preprocess
from mcpf_jax.scoring import loaders
from mcpf_jax.scoring.loaders import DEFAULT_NUM_CROPS, LoadedModel, Preprocessing

DEFAULT_BATCH_SIZE = 16

Input = str | os.PathLike[str] | np.ndarray


@dataclasses.dataclass(frozen=True)
class Result:
  """The outcome for one input.

  Attributes:
    path: the file path as given, or "<array i>" for the i-th input array.
    score: the predicted quality (see `Scorer.info["scale"]`), None when `error` is set.
    error: why the input could not be scored (names the file and the problem), None on success.
    width, height: the image's size (after EXIF orientation), None when it could not be read.
    note: remarks on a scored image (e.g. a large upscale), None if there are none.
    refused: when a limit refused the image (`max_upscale`, `max_pixels`), its facts (`images.LimitError`:
      `option`, `limit`, `needed`); `error` is its message, which advises the Python argument.
    levels: the probabilities of the model's quality classes (`Scorer.level_names`, worst to best), the mean
      over the image's crops (they sum to 1; the score is their expected level, mapped to the scale); None when
      `error` is set.
  """
  path: str
  score: float | None
  error: str | None = None
  width: int | None = None
  height: int | None = None
  note: str | None = None
  refused: images.LimitError | None = dataclasses.field(default=None, compare=False)
  levels: tuple[float, ...] | None = dataclasses.field(default=None, compare=False)

  @property
  def ok(self) -> bool:
    return self.error is None


@dataclasses.dataclass
class _Prepared:
  """One input after decoding: crops uint8 [num_crops, S, S, 3], or the error that stopped it."""
  path: str
  crops: np.ndarray | None = None
  error: str | None = None
  width: int | None = None
  height: int | None = None
  note: str | None = None
  refused: images.LimitError | None = None


def _describe_error(e: Exception, name: str) -> str:
  if isinstance(e, OSError) and e.strerror:  # FileNotFoundError, IsADirectoryError, PermissionError, ...
    return f"{name}: cannot read the file: {e.strerror}"
  text = str(e)
  return text if name in text else f"{name}: {type(e).__name__}: {text}"


def _prepare(index: int, item: Input, preprocessing: Preprocessing) -> _Prepared:
  """Reads, decodes and crops one input; every failure becomes `_Prepared.error` (never raised)."""
  if isinstance(item, np.ndarray):
    name = f"<array {index}>"
  else:
    name = os.fspath(item)
  try:
    if isinstance(item, np.ndarray):
      if item.dtype != np.uint8 or item.ndim != 3 or item.shape[-1] != 3 or 0 in item.shape:
        raise ValueError(f"expected a uint8 [height, width, 3] RGB array, got {item.dtype} {list(item.shape)}")
      data = item
    else:
      with open(name, "rb") as f:
        data = f.read()
    crops, (height, width), note = preprocessing.crops(data, name)
  except images.LimitError as e:  # the size is known: the row keeps it, and the facts for the caller's advice
    return _Prepared(name, error=str(e), width=e.width, height=e.height, refused=e.with_traceback(None))
  except Exception as e:  # pylint: disable=broad-except  (one bad file must not stop the others)
    return _Prepared(name, error=_describe_error(e, name))
  return _Prepared(name, crops=crops, width=width, height=height, note=note)


class Scorer:
  """Scores images with an IQA model: `from_pretrained`, `from_checkpoint`, `zero_shot`, or `Scorer(loaded)`.

  Attributes:
    score_range: (lowest, highest) score the model can give: the [low, high] of the scale it was trained on
      (the training split's MOS range, or the dataset's nominal scale; [0, 1] zero-shot).
    higher_is_better: False for a DMOS scale (LIVE, CSIQ, ...): there a lower score is a better image.
    scale: what a score is, in words (e.g. "MOS of livec").
    dataset: the dataset the model was trained on (None zero-shot).
    level_names: the model's quality classes, worst to best (("bad", "poor", "fair", "good", "perfect"); zero-shot
      ("Bad photo.", "Good photo.")): the order of each `Result.levels`.
    info: all of the above and where the model came from (JSON-serialisable): "scale", "score_range",
      "higher_is_better", "dataset", "model", "backbone", and for trained models "step", "trained_on" and
      "checkpoint" or "pretrained".
    preprocessing: the resize / crop protocol.
    batch_size: images per model call (a multiple of the number of local devices).
    params: the full parameter tree (backbone included), replicated on this process's devices.
  """

  def __init__(self, loaded: LoadedModel, *, batch_size: int = DEFAULT_BATCH_SIZE, num_workers: int = 2):
    """Runs `loaded` (a loader's result) on `batch_size` images per model call, decoded in `num_workers` threads
    (0: in the calling thread)."""
    model, params, preprocessing, score_map = loaded.model, loaded.params, loaded.preprocessing, loaded.score_map
    dataset, scale, info = loaded.dataset, loaded.scale, loaded.info
    self.mesh = _local_mesh()
    n_data = self.mesh.shape["data"]
    if batch_size < 1:
      raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if num_workers < 0:
      raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    self.batch_size = -(-batch_size // n_data) * n_data  # every data-parallel device gets the same share
    self.num_workers = num_workers
    self.preprocessing = preprocessing
    self.score_map = score_map or scores.ScoreMap.identity()
    self.score_range = tuple(float(v) for v in self.score_map.score_range)
    self.higher_is_better = bool(self.score_map.higher_is_better)
    self.dataset = dataset
    self.scale = scale or ("score01 on [0, 1]" if score_map is None else
                           f"{'MOS' if self.higher_is_better else 'DMOS'} of {dataset}")
    self.info = dict(info, scale=self.scale, score_range=list(self.score_range),
                     higher_is_better=self.higher_is_better, dataset=dataset, num_crops=preprocessing.num_crops,
                     resize=preprocessing.resize, image_size=preprocessing.image_size)
    self.level_names = tuple(model.spec.quality_classes)
    self._model = model
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self.params = jax.device_put(params, replicated)
    self._batch_sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))

    def eval_step(params, batch):  # uint8 [B, crops, S, S, 3] -> the means over crops of score01 [B], levels [B, L]
      score01, levels = _quality(model, params, batch["image"])
      return jnp.mean(score01, axis=-1), jnp.mean(levels, axis=-2)

    self._eval_step = jax.jit(eval_step, in_shardings=(replicated, self._batch_sharding), out_shardings=replicated)

  # -----------------------------------------------------------------------------------------------------------
  # The model as a differentiable function.

  def apply(self, params: Any, pixels: jax.Array) -> jax.Array:
    """Scores of crops, on the model's scale (`score_range`, `higher_is_better`), as a pure function of `params`.

    Args:
      params: `self.params` (or a tree like it).
      pixels: [..., S, S, 3] crops of the model's input size S (`preprocessing.image_size`): uint8 RGB, or
        floats already normalised with CLIP's mean and std (`mcpf_jax.clip.preprocess.normalize`, which maps
        0..255 values; differentiable).
    Returns:
      float32 [...]: one score per crop. jit-, grad- and vmap-able; no resizing or cropping is done here.
    """
    return self.score_map.to_mos_jax(_score01(self._model, params, pixels, self.preprocessing.image_size))

  def score_fn(self, pixels: jax.Array) -> jax.Array:
    """`apply(self.params, pixels)`: the trained model as a function of the pixels, e.g. a loss for restoration:

      loss = lambda x: -scorer.score_fn(preprocess.normalize(255 * x)).mean()   # x float [B, S, S, 3] in [0, 1]
      grads = jax.grad(loss)(x)                                                 # (negate for a DMOS scale)

    Under your own jax.jit the parameters are captured as constants; pass them as an argument with `apply` to
    keep them out of the compiled program (large backbones).
    """
    return self.apply(self.params, pixels)

  def crops_fn(self, *, portable: bool = False) -> Callable[[jax.Array], jax.Array]:
    """The scorer as one function of a batch of crops, with the parameters inside: uint8 [B, num_crops, S, S, 3]
    (`preprocessing.crops` of each image) -> float32 [B], each image's score on the model's scale as `score`
    gives it (the mean of score01 over its crops, then mapped to the scale).

    `portable`: the model as built for any platform (fused attention, the whole batch in one vision pass, no
    CPU-specific chunking, the layer stacks unrolled even for a run trained with `clip.scan_layers`; the same
    numbers), so that `jax.export` can lower it for CPU, GPU and TPU at once and with a symbolic batch size, and
    the ONNX export holds no Loop nodes (onnxruntime runs a scanned stack's Loops, with a warning per unused
    initialiser of their bodies; not every ONNX runtime runs them).
    """
    model = self._model
    if portable:
      chunk = {"image_chunk": 0} if hasattr(model.clip_config, "image_chunk") else {}
      model = model.clone(clip_config=model.clip_config.replace(platform="tpu", scan_layers=False, **chunk))
    # Portable: the parameters as host constants, so the lowering holds no device placement of this machine.
    params, score_map = (jax.device_get(self.params) if portable else self.params), self.score_map

    def scores_of(crops: jax.Array) -> jax.Array:
      return score_map.to_mos_jax(jnp.mean(_score01(model, params, crops), axis=-1))

    return scores_of
  # -----------------------------------------------------------------------------------------------------------
  # Construction: a loader (`mcpf_jax.scoring.loaders`), then the scorer around what it loaded.

  @classmethod
  def from_pretrained(cls, name_or_path: str | os.PathLike[str], *, revision: str | None = None,
                      clip_name: str | os.PathLike[str] | None = None, cache_dir: str | None = None,
                      batch_size: int = DEFAULT_BATCH_SIZE, num_crops: int | None = None, num_workers: int = 2,
                      max_upscale: float | None = images.DEFAULT_MAX_UPSCALE,
                      max_pixels: int | None = images.DEFAULT_MAX_PIXELS) -> Scorer:
    """An exported model (a folder or a hub id): `loaders.load_pretrained`; batch_size, num_workers as `Scorer`."""
    return cls(loaders.load_pretrained(name_or_path, revision=revision, clip_name=clip_name, cache_dir=cache_dir,
                                       num_crops=num_crops, max_upscale=max_upscale, max_pixels=max_pixels),
               batch_size=batch_size, num_workers=num_workers)

  @classmethod
  def from_checkpoint(cls, workdir: str | os.PathLike[str], checkpoint: str | int = "best", *,
                      batch_size: int = DEFAULT_BATCH_SIZE, num_crops: int | None = None, num_workers: int = 2,
                      clip_name: str | None = None, max_upscale: float | None = images.DEFAULT_MAX_UPSCALE,
                      max_pixels: int | None = images.DEFAULT_MAX_PIXELS, dtype: str | None = None,
                      param_dtype: str | None = None) -> Scorer:
    """A training run's checkpoint: `loaders.load_checkpoint`; batch_size, num_workers as `Scorer`."""
    return cls(loaders.load_checkpoint(workdir, checkpoint, num_crops=num_crops, clip_name=clip_name,
                                       max_upscale=max_upscale, max_pixels=max_pixels, dtype=dtype,
                                       param_dtype=param_dtype),
               batch_size=batch_size, num_workers=num_workers)

  @classmethod
  def zero_shot(cls, clip_name_or_path: str | os.PathLike[str], *, batch_size: int = DEFAULT_BATCH_SIZE,
                num_crops: int = DEFAULT_NUM_CROPS, resize: int | None = None, num_workers: int = 2,
                dtype: str = "float32", revision: str | None = None, max_upscale: float | None = None,
                max_pixels: int | None = images.DEFAULT_MAX_PIXELS) -> Scorer:
    """CLIP-IQA zero-shot (p("Good photo.") on [0, 1]): `loaders.load_zero_shot`; batch_size, num_workers as
    `Scorer`."""
    return cls(loaders.load_zero_shot(clip_name_or_path, num_crops=num_crops, resize=resize, dtype=dtype,
                                      revision=revision, max_upscale=max_upscale, max_pixels=max_pixels),
               batch_size=batch_size, num_workers=num_workers)

  # -----------------------------------------------------------------------------------------------------------
  # Scoring.

  def score(self, inputs: Input | Iterable[Input]) -> list[Result]:
    """Scores image files (paths) and/or uint8 [h, w, 3] RGB arrays; one `Result` per input, in order."""
    return list(self.iter_score(inputs))

  def iter_score(self, inputs: Input | Iterable[Input]) -> Iterator[Result]:
    """Like `score`, but yields results in input order as batches finish; `inputs` is consumed lazily.

    Inputs are read at most `3 * batch_size` ahead of the last yielded result (2 x batch_size being decoded
    or waiting, up to a batch of decoded ones; failed inputs wait with them as small error records), and only
    their crops are kept, so a generator over thousands of files is scored in bounded memory.
    """
    if isinstance(inputs, (str, os.PathLike, np.ndarray)):
      inputs = [inputs]
    items = enumerate(inputs)
    ahead = 2 * self.batch_size
    pool = (concurrent.futures.ThreadPoolExecutor(self.num_workers, thread_name_prefix="mcpf-decode")
            if self.num_workers else None)
    try:
      in_flight: collections.deque = collections.deque()

      def submit(n: int) -> None:
        for index, item in itertools.islice(items, n):
          if pool is None:
            in_flight.append(_prepare(index, item, self.preprocessing))
          else:
            in_flight.append(pool.submit(_prepare, index, item, self.preprocessing))

      pending: list[_Prepared] = []
      num_ready = 0
      submit(ahead)
      while in_flight:
        head = in_flight.popleft()
        prepared = head if pool is None else head.result()
        pending.append(prepared)
        num_ready += prepared.crops is not None
        if num_ready == self.batch_size:
          yield from self._finish(pending)
          pending, num_ready = [], 0
        submit(ahead - len(in_flight))
      yield from self._finish(pending)
    finally:
      if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)

  def _finish(self, pending: Sequence[_Prepared]) -> Iterator[Result]:
    """Scores the decoded inputs of `pending` in one padded batch; yields every input's Result in order."""
    ready = [p for p in pending if p.crops is not None]
    scores: dict[int, float] = {}
    if ready:
      s = self.preprocessing.image_size
      batch = np.zeros((self.batch_size, self.preprocessing.num_crops, s, s, 3), np.uint8)
      for k, p in enumerate(ready):
        batch[k] = p.crops
      score01, levels = self._eval_step(self.params, {"image": jax.device_put(batch, self._batch_sharding)})
      values = np.asarray(self.score_map.to_mos(np.asarray(score01)[:len(ready)].astype(np.float64)), np.float64)
      scores = {id(p): float(v) for p, v in zip(ready, values)}
      probs = {id(p): tuple(float(v) for v in row) for p, row in zip(ready, np.asarray(levels))}
    for p in pending:
      if p.crops is None:
        yield Result(p.path, None, p.error, p.width, p.height, refused=p.refused)
      elif not np.isfinite(scores[id(p)]):
        yield Result(p.path, None, f"{p.path}: the model's score is not finite ({scores[id(p)]})", p.width,
                     p.height, p.note)
      else:
        yield Result(p.path, scores[id(p)], None, p.width, p.height, p.note, levels=probs[id(p)])


def _local_mesh() -> jax.sharding.Mesh:
  """A ("data",) mesh over this process's devices: batches are split over them, the parameters replicated."""
  devices = jax.local_devices()
  return jax.make_mesh((len(devices),), ("data",), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))


def _score01(model: iqa.IQAModel, params: Any, pixels: jax.Array, image_size: int | None = None) -> jax.Array:
  """The model's score01 of crops: uint8 (normalised here) or normalised float [..., S, S, 3] -> float32 [...]."""
  out, lead = _outputs(model, params, pixels, image_size)
  return out["score01"].reshape(lead)


def _quality(model: iqa.IQAModel, params: Any, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`_score01` of crops, and their quality classes' probabilities (float32 [..., L])."""
  out, lead = _outputs(model, params, pixels)
  probs = jax.nn.softmax(out["quality_logits"], axis=-1)
  return out["score01"].reshape(lead), probs.reshape(lead + probs.shape[-1:])


def _outputs(model: iqa.IQAModel, params: Any, pixels: jax.Array, image_size: int | None = None
             ) -> tuple[dict[str, jax.Array], tuple[int, ...]]:
  """The model's outputs on crops [..., S, S, 3] (flattened to one batch), and the leading shape `...`."""
  pixels = jnp.asarray(pixels)
  if pixels.ndim < 3 or pixels.shape[-1] != 3 or (image_size and pixels.shape[-3:-1] != (image_size, image_size)):
    raise ValueError(f"expected crops of [..., {image_size or 'S'}, {image_size or 'S'}, 3], got {list(pixels.shape)}")
  x = preprocess.normalize(pixels) if pixels.dtype == jnp.uint8 else pixels
  return model.apply({"params": params}, x.reshape((-1,) + x.shape[-3:])), x.shape[:-3]


def find_images(paths: Iterable[str | os.PathLike[str]],
                extensions: frozenset[str] = images.IMAGE_EXTENSIONS) -> list[str]:
  """The files to score: files as given, folders searched recursively for `extensions`, in a fixed order.

  Folders contribute their matching entries (symlinks included, even broken ones: they get an error row) sorted
  by path; arguments keep their order and repeated files are listed once. A path that does not exist is kept
  (scoring reports it). Directories are never scored, whatever their name.
  """
  out: dict[str, None] = {}
  for path in paths:
    path = os.fspath(path)
    if os.path.isdir(path):
      found = []
      for root, dirs, files in os.walk(path):
        dirs.sort()
        found.extend(os.path.join(root, f) for f in files if os.path.splitext(f)[1].lower() in extensions)
      for f in sorted(found):
        out.setdefault(f, None)
    else:
      out.setdefault(path, None)
  return list(out)
