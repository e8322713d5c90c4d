"""A quality-aware vision tower for the tiny smoke CLIP, pre-trained on procedural "dead leaves" images.

Why: the smoke run trains prompts and fusion on top of a FROZEN tiny CLIP. A purely random vision tower barely
encodes sharpness, noise or compression: a ridge probe on its image features ranks the smoke test photos' distortion
levels far below the smoke run's target (held-out SRCC 0.8), even with high-pass random patch filters, so no prompt
could reach it; on this tower's features the same probe clears it (BENCHMARKS.md, "The smoke run's tiny CLIP").
Real CLIPs arrive quality-aware from web-scale pre-training; this module gives the tiny one the same kind of start,
without ever seeing a smoke photo.

What: `dead_leaves` draws images of the classical dead-leaves model (occluding discs with power-law radii, flat or
textured: natural-image-like 1/f spectra and edges), `pretraining_set` degrades each by the SAME distortion family as
the smoke data (`mcpf_jax.smoke.data`: blur, noise, JPEG at five levels, MOS = 5 - 0.8 level), and `pretrain` trains
the vision tower + visual projection of a tiny CLIP (text tower untouched) to predict that MOS from one 64-px crop
through a linear read-out of the normalised image feature (MSE + pairwise logistic ranking), AdamW. The read-out is
dropped; only the tower is kept.

The result is bundled (`assets/tiny_smoke_vision.safetensors`, PyTorch key names and layouts of transformers'
CLIPModel, the recipe in its metadata; `tiny.load_vision_tower` reads it) and `backbone.write(vision_weights="smoke")`
puts it into the tiny CLIP it writes; the text tower and logit scale stay random. Regenerate it with

    python -m mcpf_jax.smoke.pretrain --out mcpf_jax/smoke/assets/tiny_smoke_vision.safetensors

(minutes on a CPU: BENCHMARKS.md has the cost, the asset's metadata the seconds it took; bitwise only on the
same jax/XLA build and machine).
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import logging
import multiprocessing
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import PIL.Image
import scipy.ndimage

from mcpf_jax.clip import checkpoint, tiny
from mcpf_jax.clip.config import CLIPConfig
from mcpf_jax.clip.model import CLIP
from mcpf_jax.clip.preprocess import normalize
from mcpf_jax.smoke import backbone
from mcpf_jax.smoke import data as smoke

ASSET = backbone.TOWERS["smoke"]

# The recipe of the bundled asset (also written into its metadata).
RECIPE = dict(num_images=960, image_size=128, data_seed=0, steps=4000, batch_size=64, lr=1e-3, warmup_steps=100,
              weight_decay=1e-4, train_seed=0)


# ---------------------------------------------------------------------------------------------------------------
# Procedural images.


def dead_leaves(rng: np.random.Generator, size: int = 128, max_discs: int = 6000, r_min: float = 1.5,
                r_max: float = 48.0) -> np.ndarray:
  """One RGB uint8 [size, size, 3] dead-leaves image.

  Discs fall one after another and hide what lies under them (painted front to back: a disc only fills pixels still
  empty). Radii have density ~ r^-3 on [r_min, r_max] (scale invariance, as in natural images); colours are a
  random gray level plus a small tint; half the discs carry a smooth Gaussian texture; 30% of images are gray.
  A light blur (sigma 0.6 px) stands in for camera optics, so the pristine image is not sharper than a photo.
  """
  base = rng.uniform(30, 220)
  img = np.zeros((size, size, 3), np.float32)
  filled = np.zeros((size, size), bool)
  u = rng.random(max_discs)
  radii = (r_min ** -2 - u * (r_min ** -2 - r_max ** -2)) ** -0.5  # inverse CDF of p(r) ~ r^-3
  for r in radii:
    cy, cx = rng.uniform(-r_max / 2, size + r_max / 2, 2)
    y0, y1 = max(int(cy - r), 0), min(int(cy + r) + 2, size)
    x0, x1 = max(int(cx - r), 0), min(int(cx + r) + 2, size)
    colour = np.clip(rng.normal(base, 60) + rng.normal(0, 25, 3), 0, 255)
    textured = rng.random() < 0.5
    if textured:
      sigma, amplitude = rng.uniform(0.5, 3.0), rng.uniform(5, 40)
    if y0 >= y1 or x0 >= x1:
      continue
    yy, xx = np.mgrid[y0:y1, x0:x1]
    mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) & ~filled[y0:y1, x0:x1]
    if not mask.any():
      continue
    patch = img[y0:y1, x0:x1]
    if textured:
      tex = scipy.ndimage.gaussian_filter(rng.standard_normal((y1 - y0, x1 - x0)), sigma)
      tex *= amplitude / (tex.std() + 1e-6)
      patch[mask] = colour + tex[mask][:, None]
    else:
      patch[mask] = colour
    filled[y0:y1, x0:x1] |= mask
    if filled.all():
      break
  img = scipy.ndimage.gaussian_filter(img, (0.6, 0.6, 0.0))
  if rng.random() < 0.3:
    img = np.repeat(img.mean(-1, keepdims=True), 3, axis=-1)
  return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
  buf = io.BytesIO()
  PIL.Image.fromarray(img).save(buf, format="JPEG", quality=quality)
  buf.seek(0)
  return np.asarray(PIL.Image.open(buf).convert("RGB"))


def distorted_versions(img: np.ndarray, seed: int) -> list[tuple[np.ndarray, float]]:
  """The pristine image and its 15 smoke distortions (blur / noise / JPEG x 5 levels), each with its smoke MOS."""
  out = [(img, smoke.mos_of_level(0))]
  for level in range(1, smoke.NUM_LEVELS + 1):
    k, mos = level - 1, smoke.mos_of_level(level)
    out.append((smoke.blur(img, smoke.BLUR_SIGMAS[k]), mos))
    out.append((smoke.noise(img, smoke.NOISE_STDS[k], seed=seed + level), mos))
    out.append((_jpeg(img, smoke.JPEG_QUALITIES[k]), mos))
  return out


def _one_image(index: int, data_seed: int, image_size: int) -> list[tuple[np.ndarray, float]]:
  rng = np.random.default_rng([data_seed, index])
  return distorted_versions(dead_leaves(rng, image_size), seed=int(rng.integers(2 ** 31)))


def pretraining_set(num_images: int, image_size: int = 128, data_seed: int = 0,
                    workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """uint8 images [num_images * 16, size, size, 3] and float32 MOS [num_images * 16] (image i's versions adjacent).

  Image i depends only on (data_seed, i), so any number of worker processes gives the same set.
  """
  make = functools.partial(_one_image, data_seed=data_seed, image_size=image_size)
  workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
  if workers > 1:
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
      sets = pool.map(make, range(num_images))
  else:
    sets = [make(i) for i in range(num_images)]
  images = np.stack([img for versions in sets for img, _ in versions])
  mos = np.asarray([m for versions in sets for _, m in versions], np.float32)
  return images, mos


# ---------------------------------------------------------------------------------------------------------------
# Training the tower.


def pretrain(config: CLIPConfig, params: dict[str, Any], images: np.ndarray, mos: np.ndarray, *, steps: int,
             batch_size: int = 64, lr: float = 1e-3, warmup_steps: int = 100, weight_decay: float = 1e-4,
             train_seed: int = 0, log_every: int = 200) -> tuple[dict[str, Any], list[float]]:
  """Trains `params`' vision tower + visual projection to predict `mos` from random crops of `images`.

  Args:
    config: the tiny CLIP's configuration (crops are config.vision.image_size pixels).
    params: its full parameter tree (the text tower and logit scale are returned unchanged).
    images: uint8 [n, h, w, 3], h and w >= the crop size.
    mos: float [n], higher is better, in the smoke range [1, 5].
    steps, batch_size, lr, warmup_steps, weight_decay: AdamW with linear warm-up (at most steps // 5) and cosine
      decay.
    train_seed: crops, flips and batch order.
    log_every: steps between INFO log lines.

  Returns:
    (params with the trained tower, the loss of every step).
  """
  model = CLIP(config)
  crop = config.vision.image_size
  width = config.projection_dim
  trainable = {k: params[k] for k in tiny.VISION_TOWER}
  trainable["readout"] = {"w": np.zeros((width,), np.float32), "b": np.zeros((), np.float32)}
  frozen = {k: v for k, v in params.items() if k not in tiny.VISION_TOWER}

  def loss_fn(t, crops, target):
    p = dict(frozen, **{k: t[k] for k in tiny.VISION_TOWER})
    f = model.apply({"params": p}, normalize(crops), method=model.encode_image)
    f = f / jnp.linalg.norm(f, axis=-1, keepdims=True)
    score = 8.0 * f @ t["readout"]["w"] + t["readout"]["b"]
    normalised = (target - 3.0) / 1.5  # the smoke MOS range [1, 5] -> [-1.33, 1.33]
    mse = jnp.mean((score - normalised) ** 2)
    better = (target[:, None] - target[None]) > 0
    rank = jnp.sum(jnp.where(better, jax.nn.softplus(-4.0 * (score[:, None] - score[None])), 0.0))
    return mse + rank / jnp.maximum(jnp.sum(better), 1)

  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup_steps, steps // 5), steps)
  optimizer = optax.adamw(schedule, weight_decay=weight_decay)
  opt_state = optimizer.init(trainable)

  @jax.jit
  def step(t, o, crops, target):
    loss, grads = jax.value_and_grad(loss_fn)(t, crops, target)
    updates, o = optimizer.update(grads, o, t)
    return optax.apply_updates(t, updates), o, loss

  rng = np.random.default_rng(train_seed)
  n, h, w = images.shape[:3]
  losses = []
  start = time.time()
  for i in range(steps):
    idx = rng.integers(0, n, batch_size)
    ys, xs = rng.integers(0, h - crop + 1, batch_size), rng.integers(0, w - crop + 1, batch_size)
    batch = np.stack([images[j, y:y + crop, x:x + crop] for j, y, x in zip(idx, ys, xs)])
    flip = rng.random(batch_size) < 0.5
    batch[flip] = batch[flip, :, ::-1]
    trainable, opt_state, loss = step(trainable, opt_state, batch, mos[idx])
    losses.append(float(loss))
    if log_every and (i % log_every == 0 or i == steps - 1):
      logging.info("tiny vision pre-training: step %d/%d loss %.4f (%.0f s)", i + 1, steps, losses[-1],
                   time.time() - start)
  out = dict(params)
  out.update({k: jax.device_get(trainable[k]) for k in tiny.VISION_TOWER})
  return out, losses


# ---------------------------------------------------------------------------------------------------------------
# The bundled file.


def save_tower(path: str | os.PathLike[str], params: dict[str, Any], metadata: dict[str, Any]) -> pathlib.Path:
  """Writes the vision tower + projection of `params` as safetensors (transformers' CLIPModel keys and layouts)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tensors = checkpoint.to_torch_state_dict({k: params[k] for k in tiny.VISION_TOWER})
  save_file(tensors, str(path), metadata={"format": "pt", "mcpf_recipe": json.dumps(metadata, sort_keys=True)})
  return path


def build_asset(out: str | os.PathLike[str], *, recipe: dict[str, Any] | None = None,
                workers: int | None = None) -> dict[str, Any]:
  """Builds the smoke vision tower from scratch with `recipe` (default RECIPE) and writes it to `out`."""
  recipe = dict(RECIPE, **(recipe or {}))
  config = backbone.config()
  start = time.time()
  images, mos = pretraining_set(recipe["num_images"], recipe["image_size"], recipe["data_seed"], workers)
  data_s = time.time() - start
  params = tiny.perturbed_params(config, backbone.SEED)
  params, losses = pretrain(config, params, images, mos, steps=recipe["steps"], batch_size=recipe["batch_size"],
                            lr=recipe["lr"], warmup_steps=recipe["warmup_steps"],
                            weight_decay=recipe["weight_decay"], train_seed=recipe["train_seed"])
  meta = {"recipe": recipe, "config": config.to_hf(), "init": f"tiny.perturbed_params(seed={backbone.SEED})",
          "final_loss_mean_last_100": float(np.mean(losses[-100:])), "data_seconds": round(data_s, 1),
          "train_seconds": round(time.time() - start - data_s, 1), "jax": jax.__version__}
  save_tower(out, params, meta)
  return meta


def main(argv: list[str] | None = None) -> None:
  # argparse: a maintainer's tool with four flags and no config file (absl serves the config-file commands)
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=str(ASSET), help="safetensors file to write (default: the bundled asset)")
  parser.add_argument("--steps", type=int, default=RECIPE["steps"])
  parser.add_argument("--num_images", type=int, default=RECIPE["num_images"])
  parser.add_argument("--workers", type=int, default=None, help="image-generation processes (default: CPUs)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  meta = build_asset(args.out, recipe={"steps": args.steps, "num_images": args.num_images}, workers=args.workers)
  print(json.dumps({"out": args.out, "sha256": tiny.file_sha256(args.out), **meta}))


if __name__ == "__main__":
  main()
