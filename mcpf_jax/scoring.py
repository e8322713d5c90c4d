"""Scoring users' images: `Scorer`, from a trained checkpoint or zero-shot (CLIP-IQA), no dataset needed.

  scorer = Scorer.from_checkpoint("runs/livec")            # the run's best checkpoint
  for r in scorer.score(["photo.jpg", "scans/a.png"]):     # or scorer.iter_score(...) to stream
    print(r.path, r.score, r.error)

A checkpoint's score is on the MOS scale of the dataset the model was trained on (e.g. [1, 100] for LIVE
Challenge; a DMOS dataset keeps its lower-is-better direction, see `Scorer.info`); a zero-shot score is
p("Good photo.") on [0, 1].

Preprocessing is the evaluation protocol of the training run (`mcpf_jax.data.pipeline.eval_batches`): the image
is decoded to 8-bit RGB (`mcpf_jax.images.decode`: every PIL mode, EXIF orientation, alpha on white), resized
so its short side is `resize` (the run's `data.resize`), and `num_crops` crops of the model's input size on an
even grid are scored and averaged. Unlike evaluation, which refuses images that would be enlarged more than 2x,
any image is scored: a small one (even smaller than a crop) is resized UP to the short side `resize`, and the
result's `note` says by how much when that is more than 2x (`max_upscale` turns this into an error instead).
A very large image is decoded once, resized, and only its crops are kept.

Every image is scored alone: batches have a fixed shape (the last one padded with zero images that are
thrown away), so an image's score does not depend on what else is in its batch. A file that cannot be read or
decoded gets a `Result` with `error` set and no score; the others are still scored. `iter_score` decodes
lazily in `num_workers` threads with a bounded number of images in flight (at most 3 x batch_size images' crops,
and `num_workers` full-size decodes), so memory stays flat on folders of any size.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import os
import pathlib
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import numpy as np

from mcpf_jax import clip, images
from mcpf_jax import model as iqa
from mcpf_jax.data import pipeline
from mcpf_jax.train import checkpoints as ckpt_lib
from mcpf_jax.train import mesh as mesh_lib, optim, restore, step as step_lib

# Zero-shot defaults (a checkpoint brings its own): the evaluation protocol of configs/base.py.
DEFAULT_RESIZE = 512
DEFAULT_NUM_CROPS = 15
DEFAULT_BATCH_SIZE = 16
# Upscaling beyond this factor is noted in the result (never past 2x without saying so).
NOTE_UPSCALE = images.NOTE_UPSCALE
# File extensions collected from folders (case-insensitive); files named explicitly are always tried.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".dib", ".tif", ".tiff",
                              ".webp", ".gif", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".jp2", ".j2k"})

Input = str | os.PathLike[str] | np.ndarray


@dataclasses.dataclass(frozen=True)
class Result:
  """The outcome for one input.

  Attributes:
    path: the file path as given, or "<array i>" for the i-th input array.
    score: the predicted quality (see `Scorer.info["scale"]`), None when `error` is set.
    error: why the input could not be scored (names the file and the problem), None on success.
    width, height: the decoded image's size (after EXIF orientation), None when it could not be decoded.
    note: remarks on a scored image (e.g. a large upscale), None if there are none.
  """
  path: str
  score: float | None
  error: str | None = None
  width: int | None = None
  height: int | None = None
  note: str | None = None

  @property
  def ok(self) -> bool:
    return self.error is None


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """The evaluation protocol: short side -> `resize`, `num_crops` grid crops of `image_size` (uint8)."""
  resize: int
  image_size: int
  num_crops: int
  max_upscale: float | None = None  # refuse (error) images needing a larger upscale; None: any, noted past 2x
  max_pixels: int | None = images.DEFAULT_MAX_PIXELS  # refuse larger images before decoding them

  def __post_init__(self):
    if self.resize < self.image_size:
      raise ValueError(f"resize ({self.resize}) must be at least the crop size ({self.image_size})")
    if self.num_crops < 1:
      raise ValueError(f"num_crops must be at least 1, got {self.num_crops}")

  def crops(self, image: bytes | np.ndarray, name: str) -> tuple[np.ndarray, tuple[int, int], str | None]:
    """Encoded bytes or uint8 [h, w, 3] -> (uint8 [num_crops, image_size, image_size, 3], (h, w) before the
    resize, note or None): `images.eval_crops`, the function eval.py's pipeline uses."""
    crops, (h, w) = images.eval_crops(image, name, resize=self.resize, image_size=self.image_size,
                                      num_crops=self.num_crops, max_upscale=self.max_upscale,
                                      max_pixels=self.max_pixels)
    factor = self.resize / min(h, w)
    note = None
    if factor > NOTE_UPSCALE:
      note = f"upscaled {factor:.2f}x from {w}x{h} to a short side of {self.resize} (small image)"
    return crops, (h, w), note


@dataclasses.dataclass
class _Prepared:
  """One input after decoding: crops uint8 [num_crops, S, S, 3], or the error that stopped it."""
  path: str
  crops: np.ndarray | None = None
  error: str | None = None
  width: int | None = None
  height: int | None = None
  note: str | None = None


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
  except Exception as e:  # pylint: disable=broad-except  (one bad file must not stop the others)
    return _Prepared(name, error=_describe_error(e, name))
  return _Prepared(name, crops=crops, width=width, height=height, note=note)


class Scorer:
  """Scores images with an IQA model; build it with `from_checkpoint` or `zero_shot`.

  Attributes:
    info: what scores mean and where the model came from (JSON-serialisable): "scale", "higher_is_better",
      "model", "backbone", and for checkpoints "checkpoint", "step", "trained_on".
    preprocessing: the resize / crop protocol.
    batch_size: images per model call (a multiple of the number of local devices).
  """

  def __init__(self, model: iqa.IQAModel, params: Any, *, preprocessing: Preprocessing, to_score: Callable,
               info: dict[str, Any], batch_size: int = DEFAULT_BATCH_SIZE, num_workers: int = 2,
               mesh: jax.sharding.Mesh | None = None, param_shardings: Any = None):
    """Low-level constructor; `to_score` maps float64 [n] mean-crop score01 to the reported scale."""
    self.mesh = mesh if mesh is not None else _local_mesh(1)
    n_data = self.mesh.shape["data"]
    if batch_size < 1:
      raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if num_workers < 0:
      raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    self.batch_size = -(-batch_size // n_data) * n_data  # every data-parallel device gets the same share
    self.num_workers = num_workers
    self.preprocessing = preprocessing
    self.info = dict(info, num_crops=preprocessing.num_crops, resize=preprocessing.resize,
                     image_size=preprocessing.image_size)
    self._to_score = to_score
    p_sh = param_shardings if param_shardings is not None else mesh_lib.param_shardings(params, self.mesh)
    self._params = jax.device_put(params, p_sh)
    self._batch_sharding = mesh_lib.batch_sharding(self.mesh)
    self._eval_step = jax.jit(step_lib.make_eval_step(model), in_shardings=(p_sh, self._batch_sharding),
                              out_shardings=mesh_lib.replicated(self.mesh))

  # -----------------------------------------------------------------------------------------------------------
  # Construction.

  @classmethod
  def from_checkpoint(cls, workdir: str | os.PathLike[str], checkpoint: str | int = "best", *,
                      batch_size: int = DEFAULT_BATCH_SIZE, num_crops: int | None = None, num_workers: int = 2,
                      clip_name: str | None = None, max_upscale: float | None = None) -> Scorer:
    """Restores a trained model from a training run's workdir alone: the dataset is not needed.

    The model is rebuilt from the training config saved in the checkpoint, around the CLIP that config names
    (`clip_name` overrides where to find it, e.g. a local copy of the hub weights; its fingerprint must match
    the one the run was trained on).

    Args:
      workdir: the run's workdir (with checkpoints/), its checkpoints/ folder, or one step folder in it.
      checkpoint: "best" (validation SRCC), "latest" or a step; ignored when `workdir` is a step folder.
      batch_size: images per model call (each with `num_crops` crops).
      num_crops: crops per image; None: the run's eval.num_crops.
      num_workers: decoding threads (0: decode in the calling thread).
      clip_name: the backbone's hub id or folder, when not where the training run found it.
      max_upscale: see `Preprocessing`.

    Raises:
      FileNotFoundError: no checkpoints there, or no checkpoint `checkpoint`.
      ValueError: the backbone found is not the one the checkpoint was trained on.
    """
    workdir, checkpoint = _locate(pathlib.Path(workdir).expanduser(), checkpoint)
    ckpts = ckpt_lib.Checkpoints(workdir / "checkpoints", read_only=True)
    try:
      step = restore.checkpoint_step(ckpts, checkpoint)
      meta = ckpts.restore_meta(step)
      config = restore.run_config(workdir, meta)
      bundle = restore.load_clip(config, workdir, name=clip_name)
      ckpt_lib.check_backbone(meta, bundle.source, bundle.fingerprint, ckpts.directory / str(step))
      model, params = iqa.build(config.model, bundle, jax.random.key(config.seed))
      labels = optim.trainable_labels(params, config.model.trainable)
      mesh = _local_mesh(config.mesh.model)
      params = restore.restore_params(config, ckpts, step, params, labels, mesh)
    finally:
      ckpts.close()
    label_transform = pipeline.LabelTransform(**meta["label_transform"])
    preprocessing = Preprocessing(
        resize=int(config.data.resize), image_size=int(config.data.image_size or bundle.config.vision.image_size),
        num_crops=int(num_crops or config.eval.num_crops), max_upscale=max_upscale)
    lt = label_transform
    info = {"model": config.model.name, "checkpoint": str(ckpts.directory / str(step)), "step": int(step),
            "trained_on": meta.get("dataset"), "backbone": bundle.source,
            "scale": f"{'MOS' if lt.higher_is_better else 'DMOS'} of {meta.get('dataset')} "
                     f"([{lt.low:g}, {lt.high:g}] is the training range)",
            "higher_is_better": bool(lt.higher_is_better)}
    return cls(model, params, preprocessing=preprocessing, to_score=label_transform.to_mos, info=info,
               batch_size=batch_size, num_workers=num_workers, mesh=mesh,
               param_shardings=mesh_lib.param_shardings(params, mesh, config.mesh.shard_backbone))

  @classmethod
  def zero_shot(cls, clip_name_or_path: str | os.PathLike[str], *, batch_size: int = DEFAULT_BATCH_SIZE,
                num_crops: int = DEFAULT_NUM_CROPS, resize: int | None = None, num_workers: int = 2,
                dtype: str = "float32", revision: str | None = None,
                max_upscale: float | None = None) -> Scorer:
    """CLIP-IQA zero-shot scoring: p("Good photo.") against "Bad photo." on [0, 1]; nothing is trained.

    Args:
      clip_name_or_path: a hub id ("openai/clip-vit-base-patch16"), a preset or a local HF CLIP folder.
      resize: short side before cropping; None: 512, or the CLIP's input size if that is larger.
      Others as `from_checkpoint`; dtype and revision as `mcpf_jax.clip.load`.
    """
    bundle = clip.load(clip_name_or_path, dtype=dtype, revision=revision)
    if bundle.tokenizer is None:
      raise ValueError(f"{clip_name_or_path}: the CLIP folder has no tokenizer files (vocab.json + merges.txt "
                       "or tokenizer.json); zero-shot scoring needs them to encode its prompts")
    model, params = iqa.build({"name": "clipiqa"}, bundle, jax.random.key(0))
    size = bundle.config.vision.image_size
    preprocessing = Preprocessing(resize=resize or max(DEFAULT_RESIZE, size), image_size=size,
                                  num_crops=num_crops, max_upscale=max_upscale)
    info = {"model": "clipiqa", "backbone": bundle.source, "higher_is_better": True,
            "scale": 'p("Good photo.") on [0, 1] (zero-shot CLIP-IQA)'}
    return cls(model, params, preprocessing=preprocessing, to_score=lambda s: np.asarray(s, np.float64),
               info=info, batch_size=batch_size, num_workers=num_workers, mesh=_local_mesh(1))

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
      score01 = np.asarray(self._eval_step(self._params, {"image": jax.device_put(batch, self._batch_sharding)}))
      values = np.asarray(self._to_score(score01[:len(ready)].astype(np.float64)), np.float64)
      scores = {id(p): float(v) for p, v in zip(ready, values)}
    for p in pending:
      if p.crops is None:
        yield Result(p.path, None, p.error)
      elif not np.isfinite(scores[id(p)]):
        yield Result(p.path, None, f"{p.path}: the model's score is not finite ({scores[id(p)]})", p.width,
                     p.height, p.note)
      else:
        yield Result(p.path, scores[id(p)], None, p.width, p.height, p.note)


def _local_mesh(model: int) -> jax.sharding.Mesh:
  """A ("data", "model") mesh over this process's devices; `model` is kept when it divides their number."""
  devices = jax.local_devices()
  model = model if model >= 1 and len(devices) % model == 0 else 1
  return mesh_lib.make_mesh(-1, model, devices)


def _locate(path: pathlib.Path, checkpoint: str | int) -> tuple[pathlib.Path, str | int]:
  """(workdir, checkpoint) from a workdir, its checkpoints/ folder or a step folder inside it."""
  if (path / "checkpoints").is_dir():
    return path, checkpoint
  if path.name == "checkpoints" and path.is_dir():
    return path.parent, checkpoint
  if path.name.isdigit() and path.parent.name == "checkpoints" and path.is_dir():
    return path.parent.parent, int(path.name)
  raise FileNotFoundError(f"{path}: not a training run (expected a workdir with checkpoints/, its checkpoints/ "
                          "folder, or a checkpoints/<step> folder)")


def find_images(paths: Iterable[str | os.PathLike[str]],
                extensions: frozenset[str] = IMAGE_EXTENSIONS) -> list[str]:
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
