"""Scoring users' images: `Scorer`, from an exported model, a trained checkpoint or zero-shot (CLIP-IQA).

  scorer = Scorer.from_pretrained("exported/livec")        # or a hub id; or Scorer.from_checkpoint("runs/livec")
  for r in scorer.score(["photo.jpg", "scans/a.png"]):     # or scorer.iter_score(...) to stream
    print(r.path, r.score, r.error)
  scorer.score_range, scorer.higher_is_better, scorer.scale   # what a score means
  dict(zip(scorer.level_names, r.levels))                     # the quality levels' probabilities of one image

A trained model's score is on the MOS scale of the dataset it was trained on (e.g. [1, 100] for LIVE Challenge;
a DMOS dataset keeps its lower-is-better direction: `higher_is_better` is False); a zero-shot score is
p("Good photo.") on [0, 1]. `Scorer.score_fn` is the model as a pure, differentiable function of crops.

This module depends on the model, CLIP, image and score-mapping code only (`mcpf_jax.runs` reads a training
run's workdir, `mcpf_jax.pretrained` an exported folder): nothing of `mcpf_jax.train`.

Preprocessing is the evaluation protocol of the training run (`mcpf_jax.data.pipeline.eval_batches`): the image
is decoded to 8-bit RGB (`mcpf_jax.images.decode`: every PIL mode, EXIF orientation, alpha on white), resized
so its short side is `resize` (the run's `data.resize`), and `num_crops` crops of the model's input size on an
even grid are scored and averaged: `images.eval_crops`, the function eval.py's pipeline uses, with the same
upscale limit (a trained model's Scorer refuses, per file, an image that would be enlarged more than 2x, as
evaluation does; `max_upscale=None` scores any image, resized UP, with a `note` past 2x; zero-shot scorers have
no run protocol and default to None). A large JPEG is decoded at a reduced DCT scale, and only its crops kept.
Images of more than `max_pixels` pixels (default `images.DEFAULT_MAX_PIXELS`, ~89 MP: a decompression-bomb guard)
are refused; a larger `max_pixels` allows them, replacing PIL's own guard for this Scorer only. A refusal by
either limit keeps the facts in `Result.refused` (`images.LimitError`: the image's size, the limit, the value that
would allow it).

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
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mcpf_jax import clip, images, pretrained, resolve, runs, scores
from mcpf_jax import model as iqa
from mcpf_jax.clip import checkpoint as clip_checkpoint
from mcpf_jax.clip import hub, preprocess

# Zero-shot defaults (a checkpoint brings its own): the evaluation protocol of configs/base.py.
DEFAULT_RESIZE = 512
DEFAULT_NUM_CROPS = 15
DEFAULT_BATCH_SIZE = 16
# Upscaling beyond this factor is noted in the result (never past 2x without saying so).
NOTE_UPSCALE = images.NOTE_UPSCALE

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


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """The evaluation protocol: short side -> `resize`, `num_crops` grid crops of `image_size` (uint8)."""
  resize: int
  image_size: int
  num_crops: int
  max_upscale: float | None = None  # refuse (error) images needing a larger upscale; None: any, noted past 2x
  max_pixels: int | None = images.DEFAULT_MAX_PIXELS  # refuse larger images before decoding (replaces PIL's guard)

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
  """Scores images with an IQA model; build it with `from_pretrained`, `from_checkpoint` or `zero_shot`.

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

  def __init__(self, model: iqa.IQAModel, params: Any, *, preprocessing: Preprocessing,
               score_map: scores.ScoreMap | None = None, info: dict[str, Any],
               batch_size: int = DEFAULT_BATCH_SIZE, num_workers: int = 2, scale: str | None = None,
               dataset: str | None = None):
    """Low-level constructor; `score_map` maps the model's score01 to the reported scale (None: as it is)."""
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
    CPU-specific chunking; the same numbers), so that `jax.export` can lower it for CPU, GPU and TPU at once and
    with a symbolic batch size.
    """
    model = self._model
    if portable:
      model = model.clone(spec=dataclasses.replace(model.spec, image_chunk=0),
                          clip_config=model.clip_config.replace(platform="tpu"))
    # Portable: the parameters as host constants, so the lowering holds no device placement of this machine.
    params, score_map = (jax.device_get(self.params) if portable else self.params), self.score_map

    def scores_of(crops: jax.Array) -> jax.Array:
      return score_map.to_mos_jax(jnp.mean(_score01(model, params, crops), axis=-1))

    return scores_of

  # -----------------------------------------------------------------------------------------------------------
  # Construction.

  @classmethod
  def from_pretrained(cls, name_or_path: str | os.PathLike[str], *, revision: str | None = None,
                      clip_name: str | os.PathLike[str] | None = None, cache_dir: str | None = None,
                      batch_size: int = DEFAULT_BATCH_SIZE, num_crops: int | None = None, num_workers: int = 2,
                      max_upscale: float | None = images.DEFAULT_MAX_UPSCALE,
                      max_pixels: int | None = images.DEFAULT_MAX_PIXELS) -> Scorer:
    """Loads an exported model (`python -m mcpf_jax.export`): a local folder or a Hugging Face Hub repo id.

    A local folder never touches the network: the backbone comes from `clip_name`, else from the folder's own
    (`--include_backbone`: its relative `backbone.path`), else the Hugging Face cache (read only). A hub id is
    fetched through huggingface_hub's cache (HF_HUB_OFFLINE=1: the cache only), and so is its backbone when the
    folder has none. The backbone's fingerprint must be the one the model was trained on.

    Args:
      name_or_path: an exported folder, or a hub repo id ("org/name").
      revision: the hub branch, tag or commit (hub ids only).
      clip_name: where the backbone is (a local CLIP folder, or a hub id to download it from).
      cache_dir: the Hugging Face cache (default: huggingface_hub's, HF_HUB_CACHE).
      Others as `from_checkpoint`.

    Raises:
      FileNotFoundError: no such folder / not in the cache; `pretrained.MissingBackbone` when the backbone cannot
        be found (the message names its fingerprint and the command that gives it).
      ValueError: not an exported model, a damaged file, or another backbone than the one trained on.
    """
    local = pretrained.is_local(name_or_path)
    if local:
      if revision is not None:
        raise ValueError(f"revision={revision!r} given for the local folder {name_or_path}")
      folder = pathlib.Path(name_or_path).expanduser()
    else:
      folder = hub.snapshot(str(name_or_path), revision=revision, cache_dir=cache_dir)
    config = pretrained.read_config(folder)
    bundle = _pretrained_backbone(folder, config, clip_name, name_or_path=name_or_path, local=local,
                                  cache_dir=cache_dir)
    where = folder / pretrained.CONFIG_FILE
    want = config["backbone"]["fingerprint"]
    if bundle.fingerprint != want:
      trained_on = config["backbone"].get("hub_id") or "a local CLIP"
      raise ValueError(f"{where}: the model was trained on the CLIP backbone {trained_on!r} "
                       f"(fingerprint {want}), but the backbone found, {bundle.source!r}, has fingerprint "
                       f"{bundle.fingerprint}; give the original weights with clip_name / --clip")
    own = pretrained.read_params(folder / pretrained.WEIGHTS_FILE)
    model, params = _build(config["model"], bundle, config["seed"], own, folder / pretrained.WEIGHTS_FILE,
                           complete=True)
    prep = config["preprocessing"]
    preprocessing = Preprocessing(resize=int(prep["resize"]), image_size=int(prep["image_size"]),
                                  num_crops=int(num_crops or prep["num_crops"]), max_upscale=max_upscale,
                                  max_pixels=max_pixels)
    s = config["score"]
    score_map = scores.ScoreMap(**{k: s[k] for k in ("low", "high", "higher_is_better", "train_low01",
                                                            "train_high01", "num_levels")})
    training = config.get("training", {})
    info = {"model": config["model"].get("name", "mcpf"), "pretrained": str(name_or_path),
            "folder": str(folder), "step": training.get("step"), "trained_on": s.get("dataset"),
            "backbone": bundle.source}
    return cls(model, params, preprocessing=preprocessing, score_map=score_map, info=info, batch_size=batch_size,
               num_workers=num_workers, scale=s.get("scale"), dataset=s.get("dataset"))

  @classmethod
  def from_checkpoint(cls, workdir: str | os.PathLike[str], checkpoint: str | int = "best", *,
                      batch_size: int = DEFAULT_BATCH_SIZE, num_crops: int | None = None, num_workers: int = 2,
                      clip_name: str | None = None, max_upscale: float | None = images.DEFAULT_MAX_UPSCALE,
                      max_pixels: int | None = images.DEFAULT_MAX_PIXELS, dtype: str | None = None,
                      param_dtype: str | None = None) -> Scorer:
    """Restores a trained model from a training run's workdir alone: the dataset is not needed.

    The model is rebuilt from the run's config (run.json, or the one saved in the checkpoint), around the CLIP
    that config names (`clip_name` overrides where to find it, e.g. a local copy of the hub weights; its
    fingerprint must match the one the run was trained on). Only the checkpoint's trainable parameters are
    read (`mcpf_jax.runs.read_params`): no optimizer state, in either checkpoint layout.

    Args:
      workdir: the run's workdir (with checkpoints/), its checkpoints/ folder, or one step folder in it.
      checkpoint: "best" (validation SRCC), "latest" or a step; ignored when `workdir` is a step folder.
      batch_size: images per model call (each with `num_crops` crops).
      num_crops: crops per image; None: the run's eval.num_crops.
      num_workers: decoding threads (0: decode in the calling thread).
      clip_name: the backbone's hub id or folder, when not where the training run found it.
      max_upscale: see `Preprocessing`; default the evaluation protocol's (eval.py's) limit, 2x: a smaller image
        is refused naming the file (None: score it, with a note past 2x).
      max_pixels: refuse images with more pixels than this before decoding them (a decompression-bomb guard);
        larger values allow larger images, replacing PIL's own guard (`PIL.Image.MAX_IMAGE_PIXELS`) for this
        Scorer only. A huge JPEG is decoded at a reduced scale, in about the memory of a small one.
      dtype, param_dtype: score in another precision than the run's clip.dtype / clip.param_dtype (e.g.
        "bfloat16" for both: half the backbone memory; README "bfloat16" has the measured score differences).

    Raises:
      FileNotFoundError: no checkpoints there, or no checkpoint `checkpoint`.
      ValueError: the backbone found is not the one the checkpoint was trained on; a checkpoint of an unknown
        layout.
    """
    workdir, checkpoint = runs.locate(workdir, checkpoint)
    with runs.ReadOnlyCheckpoints(runs.checkpoint_dir(workdir)) as ckpts:
      step = runs.readable_step(ckpts, checkpoint)  # "best" skips a damaged step; others name it
      step_dir = ckpts.directory / str(step)
    meta = runs.read_meta(step_dir)
    config = resolve.saved_config(runs.read_run(workdir), meta)
    with config.unlocked():
      config.clip.dtype = dtype or config.clip.dtype
      config.clip.param_dtype = param_dtype or config.clip.get("param_dtype", "float32")
    bundle = runs.load_clip(config, workdir, name=clip_name)
    runs.check_backbone(meta, bundle.source, bundle.fingerprint, step_dir)
    model, params = _build(config.model, bundle, config.seed, runs.read_params(step_dir), step_dir, complete=False)
    score_map = scores.ScoreMap(**meta["label_transform"])
    preprocessing = Preprocessing(
        resize=int(config.data.resize), image_size=resolve.image_size(config, bundle.config),
        num_crops=int(num_crops or config.eval.num_crops), max_upscale=max_upscale, max_pixels=max_pixels)
    info = {"model": config.model.name, "checkpoint": str(step_dir), "step": int(step),
            "trained_on": meta.get("dataset"), "backbone": bundle.source}
    return cls(model, params, preprocessing=preprocessing, score_map=score_map, info=info, batch_size=batch_size,
               num_workers=num_workers, dataset=meta.get("dataset"))

  @classmethod
  def zero_shot(cls, clip_name_or_path: str | os.PathLike[str], *, batch_size: int = DEFAULT_BATCH_SIZE,
                num_crops: int = DEFAULT_NUM_CROPS, resize: int | None = None, num_workers: int = 2,
                dtype: str = "float32", revision: str | None = None, max_upscale: float | None = None,
                max_pixels: int | None = images.DEFAULT_MAX_PIXELS) -> Scorer:
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
                                  num_crops=num_crops, max_upscale=max_upscale, max_pixels=max_pixels)
    info = {"model": "clipiqa", "backbone": bundle.source}
    return cls(model, params, preprocessing=preprocessing, info=info, batch_size=batch_size,
               num_workers=num_workers, scale='p("Good photo.") on [0, 1] (zero-shot CLIP-IQA)')

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


def _build(model_config: Any, bundle: clip.Bundle, seed: int, own: dict[str, Any], where: pathlib.Path, *,
           complete: bool) -> tuple[iqa.IQAModel, Any]:
  """The model around `bundle`, with the parameters `own` ({"path/to/leaf": array}) in place of its initial ones.

  `complete`: `own` must hold every leaf outside the backbone (an exported folder); otherwise (a checkpoint: the
  trainable leaves) the others keep their initial values, drawn from `seed` as in training.
  """
  model, params = iqa.build(model_config, bundle, jax.random.key(seed))
  flat = traverse_util.flatten_dict(params, sep="/")
  unknown = sorted(set(own) - set(flat))
  if unknown:
    raise ValueError(f"{where}: parameters the model built from its config does not have: {unknown[:5]}"
                     f"{' ...' if len(unknown) > 5 else ''} ({len(unknown)} of {len(own)})")
  if complete:
    missing = sorted(k for k in flat if not k.startswith("clip/") and k not in own)
    if missing:
      raise ValueError(f"{where}: missing parameters of the model: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
  wrong = [f"{k} is {own[k].dtype}{list(own[k].shape)}, expected {flat[k].dtype}{list(flat[k].shape)}"
           for k in sorted(own) if tuple(own[k].shape) != tuple(flat[k].shape) or own[k].dtype != flat[k].dtype]
  if wrong:
    raise ValueError(f"{where}: parameters of the wrong shape or dtype: {'; '.join(wrong[:5])}")
  flat.update({k: jnp.asarray(v) for k, v in own.items()})
  return model, traverse_util.unflatten_dict(flat, sep="/")


def _pretrained_backbone(folder: pathlib.Path, config: dict[str, Any], clip_name: str | os.PathLike[str] | None, *,
                         name_or_path: str | os.PathLike[str], local: bool, cache_dir: str | None) -> clip.Bundle:
  """The CLIP an exported model needs: `clip_name`, else the folder's own (`backbone.path`, relative to it), else
  the backbone's hub id (read from the Hugging Face cache only when the model came from a local folder)."""
  dtype = config["clip"].get("dtype", "float32")
  if clip_name is not None:
    return clip.load(clip_name, dtype=dtype)
  included = pretrained.included_backbone(folder, config)
  if included is not None:
    return clip_checkpoint.load_folder(included, dtype=dtype)
  backbone = config["backbone"]
  hub_id, revision = backbone.get("hub_id"), backbone.get("revision")
  if hub_id is None:
    raise pretrained.missing_backbone(name_or_path, config, "it is not included in the folder and has no hub id to "
                                      "be found by")
  try:
    if not local:  # through the cache (HF_HUB_OFFLINE honoured), fetching only config, weights and tokenizer
      return clip.load(hub_id, dtype=dtype, revision=revision, cache_dir=cache_dir)
    snapshot = hub.snapshot(hub_id, revision=revision, cache_dir=cache_dir, local_files_only=True)
    return clip_checkpoint.load_folder(snapshot, dtype=dtype, source=f"hf://{hub_id}@{snapshot.name}")
  except FileNotFoundError as e:
    raise pretrained.missing_backbone(
        name_or_path, config, f"it is not included in the folder and could not be found"
        f"{' in the Hugging Face cache (a local folder never downloads)' if local else ''} ({e})") from e


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
