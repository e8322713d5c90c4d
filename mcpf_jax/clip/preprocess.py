"""CLIP's pixel normalisation: /255, then per-channel mean/std (OpenAI CLIP's constants).

Only this last step of CLIP's preprocessing is used: IQA does not squeeze a whole image into CLIP's input size (that
would change the very quality being scored); the crops come from `mcpf_jax.images` (short side `data.resize`, then
crops of the model's input size), and `normalize` runs inside jit on uint8 batches.
tests/test_preprocess.py checks it against transformers' CLIPImageProcessor on such crops.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize(pixels: jax.Array | np.ndarray, mean: Sequence[float] = CLIP_MEAN,
              std: Sequence[float] = CLIP_STD) -> jax.Array:
  """uint8 (or 0..255 float) [..., height, width, 3] -> float32 (pixels / 255 - mean) / std. Jittable."""
  x = jnp.asarray(pixels).astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


# SigLIP and SigLIP 2 (their preprocessor_config.json): pixels / 255 mapped to [-1, 1].
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


def renormalize(pixels: jax.Array, mean: Sequence[float], std: Sequence[float], from_mean: Sequence[float] = CLIP_MEAN,
                from_std: Sequence[float] = CLIP_STD) -> jax.Array:
  """Pixels normalised with (from_mean, from_std) -> the same pixels normalised with (mean, std), exactly (affine)."""
  x = jnp.asarray(pixels, jnp.float32) * jnp.asarray(from_std, jnp.float32) + jnp.asarray(from_mean, jnp.float32)
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
