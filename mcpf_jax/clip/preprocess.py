"""CLIP's image preprocessing: short-side resize (bicubic), centre crop, /255, per-channel mean/std.

The same steps and rounding as transformers' `CLIPImageProcessor` (PIL backend): PIL resizes the uint8 image so
its short side is `size` and its long side `int(size * long / short)`, the crop starts at
`(height - crop) // 2`, and scaling happens in float64 before the float32 normalisation. Output is channels-last
float32 `[batch, height, width, 3]`, our model's layout.

`normalize` is the last step alone, in jax.numpy, for use inside jit on uint8 batches (the data pipeline
sends uint8 crops to the device and normalises there).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mcpf_jax import images

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_CONFIG = "preprocessor_config.json"


def normalize(pixels: jax.Array | np.ndarray, mean: Sequence[float] = CLIP_MEAN,
              std: Sequence[float] = CLIP_STD) -> jax.Array:
  """uint8 (or 0..255 float) [..., height, width, 3] -> float32 (pixels / 255 - mean) / std. Jittable."""
  x = jnp.asarray(pixels).astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def _size_from_config(value: Any, path: pathlib.Path, key: str) -> int | tuple[int, int]:
  """transformers' size formats: an int, {"shortest_edge": n}, or {"height": h, "width": w}."""
  if isinstance(value, int):
    return value
  if isinstance(value, dict):
    if "shortest_edge" in value and value.get("longest_edge") is None:
      return int(value["shortest_edge"])
    if "height" in value and "width" in value:
      return int(value["height"]), int(value["width"])
  if isinstance(value, (list, tuple)) and len(value) == 2:
    return int(value[0]), int(value[1])
  raise ValueError(f"{path}: unsupported {key} {value!r} (expected an int, {{'shortest_edge': n}} or "
                   "{'height': h, 'width': w})")


@dataclasses.dataclass(frozen=True)
class Preprocessor:
  """CLIP image preprocessing, configured like a transformers `preprocessor_config.json`.

  Attributes:
    size: resize target: an int is the short side (aspect kept), (h, w) an exact size, None no resize.
    crop_size: (h, w) of the centre crop, None for no crop.
    resample: PIL filter of the resize (3 = bicubic, CLIP's).
    rescale_factor: pixel scale (1/255), None to keep 0..255.
    mean: per-channel mean subtracted after scaling, None for no normalisation.
    std: per-channel standard deviation divided by.
  """

  size: int | tuple[int, int] | None = 224
  crop_size: tuple[int, int] | None = (224, 224)
  resample: int = int(images.BICUBIC)
  rescale_factor: float | None = 1 / 255
  mean: tuple[float, float, float] | None = CLIP_MEAN
  std: tuple[float, float, float] | None = CLIP_STD

  @classmethod
  def for_image_size(cls, image_size: int) -> Preprocessor:
    """CLIP's preprocessing for a model with `image_size` x `image_size` inputs (224, or 336 for L/14-336)."""
    return cls(size=image_size, crop_size=(image_size, image_size))

  @classmethod
  def from_pretrained(cls, folder: str | os.PathLike[str]) -> Preprocessor:
    """Reads `preprocessor_config.json` from a checkpoint folder; CLIP's defaults when the folder has none.

    Keys read: do_resize, size, resample, do_center_crop, crop_size, do_rescale, rescale_factor, do_normalize,
    image_mean, image_std. A missing key keeps CLIP's default.

    Raises:
      FileNotFoundError: `folder` is not a directory.
      ValueError: the file is not valid JSON or holds unsupported values.
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
      raise FileNotFoundError(f"{folder}: not a checkpoint folder (expected a directory, optionally with "
                              f"{PREPROCESSOR_CONFIG})")
    path = folder / PREPROCESSOR_CONFIG
    if not path.is_file():
      return cls()
    try:
      config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
      raise ValueError(f"{path}: expected a JSON object")
    default = cls()
    size = _size_from_config(config.get("size", default.size), path, "size")
    crop = config.get("crop_size", default.crop_size)
    crop = _size_from_config(crop, path, "crop_size")
    if isinstance(crop, int):
      crop = (crop, crop)
    mean = tuple(float(v) for v in config.get("image_mean", default.mean))
    std = tuple(float(v) for v in config.get("image_std", default.std))
    if len(mean) != 3 or len(std) != 3:
      raise ValueError(f"{path}: image_mean and image_std need 3 values, got {mean} and {std}")
    return cls(
        size=size if config.get("do_resize", True) else None,
        crop_size=crop if config.get("do_center_crop", True) else None,
        resample=int(config.get("resample", default.resample)),
        rescale_factor=float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else None,
        mean=mean if config.get("do_normalize", True) else None,
        std=std if config.get("do_normalize", True) else None,
    )

  def resize_and_crop(self, img: np.ndarray) -> np.ndarray:
    """uint8 [h, w, 3] -> uint8 [crop_h, crop_w, 3] (resized and centre-cropped)."""
    if self.size is not None:
      if isinstance(self.size, int):
        img = images.resize_short_side(img, self.size, max_upscale=None, resample=self.resample)
      else:
        img = images.resize(img, *self.size, resample=self.resample)
    if self.crop_size is not None:
      height, width = img.shape[:2]
      if self.crop_size[0] > height or self.crop_size[1] > width:
        raise ValueError(f"centre crop {self.crop_size} is larger than the {height}x{width} resized image "
                         f"(size={self.size})")
      img = images.crop(img, *images.center_crop_position(height, width, self.crop_size), self.crop_size)
    return img

  def __call__(self, imgs: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Preprocesses images for CLIP.

    Args:
      imgs: uint8 [h, w, 3], [batch, h, w, 3], or a sequence of uint8 [h_i, w_i, 3] of any sizes.

    Returns:
      float32 [batch, crop_h, crop_w, 3], channels last.
    """
    if isinstance(imgs, np.ndarray) and imgs.ndim == 3:
      imgs = [imgs]
    out = []
    for img in imgs:
      x = self.resize_and_crop(np.asarray(img))
      # float64 scaling then float32, as transformers, so the two agree to float32 rounding.
      x = x.astype(np.float64) * self.rescale_factor if self.rescale_factor is not None else x.astype(np.float64)
      x = x.astype(np.float32)
      if self.mean is not None:
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
      out.append(x)
    if len({x.shape for x in out}) > 1:
      raise ValueError(f"images of different sizes after preprocessing ({sorted({x.shape for x in out})}); set "
                       "crop_size to batch them")
    if not out:
      if self.crop_size is None:
        raise ValueError("no images, and no crop_size to give an empty batch its shape")
      return np.zeros((0, *self.crop_size, 3), np.float32)
    return np.stack(out)
