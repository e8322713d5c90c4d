"""Loaders: an exported folder, a training run or a CLIP (zero-shot) -> a `LoadedModel`, what a `Scorer` runs.

Each reads its source once and returns the model, its parameters, the evaluation protocol (`Preprocessing`) and
the map of the model's score01 to the reported scale; nothing here runs the model on images.

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
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mcpf_jax import clip, images, pretrained, resolve, runs, scores
from mcpf_jax import model as iqa
from mcpf_jax.clip import checkpoint as clip_checkpoint
from mcpf_jax.clip import hub

# Zero-shot defaults (a checkpoint brings its own): the evaluation protocol of configs/base.py.
DEFAULT_RESIZE = 512
DEFAULT_NUM_CROPS = 15
# Upscaling beyond this factor is noted in the result (never past 2x without saying so).
NOTE_UPSCALE = images.NOTE_UPSCALE


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



@dataclasses.dataclass(frozen=True, eq=False)
class LoadedModel:
  """What a loader returns and a `Scorer` runs: the model and its full parameter tree, the evaluation protocol,
  the map of score01 to the reported scale (None: score01 as it is), and where it came from (`info`)."""
  model: iqa.IQAModel
  params: Any
  preprocessing: Preprocessing
  info: dict[str, Any]
  score_map: scores.ScoreMap | None = None
  scale: str | None = None  # what a score is, in words; None: "MOS of <dataset>" (or DMOS), or score01
  dataset: str | None = None  # the dataset the model was trained on (None zero-shot)


def load_pretrained(name_or_path: str | os.PathLike[str], *, revision: str | None = None,
                    clip_name: str | os.PathLike[str] | None = None, cache_dir: str | None = None,
                    num_crops: int | None = None, max_upscale: float | None = images.DEFAULT_MAX_UPSCALE,
                    max_pixels: int | None = images.DEFAULT_MAX_PIXELS) -> LoadedModel:
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
    Others as `load_checkpoint`.

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
  return LoadedModel(model, params, preprocessing, info, score_map=score_map, scale=s.get("scale"),
                     dataset=s.get("dataset"))


def load_checkpoint(workdir: str | os.PathLike[str], checkpoint: str | int = "best", *, num_crops: int | None = None,
                    clip_name: str | None = None, max_upscale: float | None = images.DEFAULT_MAX_UPSCALE,
                    max_pixels: int | None = images.DEFAULT_MAX_PIXELS, dtype: str | None = None,
                    param_dtype: str | None = None) -> LoadedModel:
  """Restores a trained model from a training run's workdir alone: the dataset is not needed.

  The model is rebuilt from the run's config (run.json, or the one saved in the checkpoint), around the CLIP
  that config names (`clip_name` overrides where to find it, e.g. a local copy of the hub weights; its
  fingerprint must match the one the run was trained on). Only the checkpoint's trainable parameters are
  read (`mcpf_jax.runs.read_params`): no optimizer state, in either checkpoint layout.

  Args:
    workdir: the run's workdir (with checkpoints/), its checkpoints/ folder, or one step folder in it.
    checkpoint: "best" (validation SRCC), "latest" or a step; ignored when `workdir` is a step folder.
    num_crops: crops per image; None: the run's eval.num_crops.
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
  return LoadedModel(model, params, preprocessing, info, score_map=score_map, dataset=meta.get("dataset"))


def load_zero_shot(clip_name_or_path: str | os.PathLike[str], *, num_crops: int = DEFAULT_NUM_CROPS,
                   resize: int | None = None, dtype: str = "float32", revision: str | None = None,
                   max_upscale: float | None = None,
                   max_pixels: int | None = images.DEFAULT_MAX_PIXELS) -> LoadedModel:
  """CLIP-IQA zero-shot: p("Good photo.") against "Bad photo." on [0, 1]; nothing is trained.

  Args:
    clip_name_or_path: a hub id ("openai/clip-vit-base-patch16"), a preset or a local HF CLIP folder.
    resize: short side before cropping; None: 512, or the CLIP's input size if that is larger.
    Others as `load_checkpoint`; dtype and revision as `mcpf_jax.clip.load`.
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
  return LoadedModel(model, params, preprocessing, info, scale='p("Good photo.") on [0, 1] (zero-shot CLIP-IQA)')


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


