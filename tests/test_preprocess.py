"""mcpf_jax.clip.preprocess.normalize against transformers' CLIP image processor (PIL backend, no torch needed).

What production does to pixels: crops from mcpf_jax.images (eval_crops / the training crops), then `normalize`
inside jit. transformers' processor with resizing and centre-cropping switched off does the same
rescale + normalisation, in float64 before its float32 cast; what remains is float32 rounding (|x| < 2.2 after
normalisation, float32 spacing there ~2.4e-7), hence atol 1e-5.
"""

import jax
import numpy as np
import pytest
from transformers import CLIPImageProcessorPil

from mcpf_jax import images
from mcpf_jax.clip import preprocess


def rgb(h, w, seed=0):
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w]
  base = np.stack([127 + 100 * np.sin(x / 7.0), 127 + 100 * np.cos(y / 5.0), (x + y) % 256], -1)
  return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def hf_pixels(processor, image):
  out = processor(images=[image], return_tensors="np")["pixel_values"][0]
  return np.moveaxis(out, 0, -1)  # [3, H, W] -> [H, W, 3]


def test_normalize_in_jit_matches_transformers_on_a_crop():
  crop = rgb(224, 224, seed=5)  # already crop-sized: the processor only rescales and normalises
  ours = jax.jit(preprocess.normalize)(crop[None])
  assert ours.dtype == np.float32 and ours.shape == (1, 224, 224, 3)
  np.testing.assert_allclose(np.asarray(ours[0]), hf_pixels(CLIPImageProcessorPil(), crop), rtol=0, atol=1e-5)


@pytest.mark.parametrize("h,w", [(300, 199), (257, 640)])
def test_the_production_crops_normalised_match_transformers(h, w):
  """eval.py's and the Scorer's crops of an image, normalised as in production, against transformers."""
  image = rgb(h, w, seed=h)
  crops, _ = images.eval_crops(image, "synthetic.png", resize=128, image_size=64, num_crops=4)
  processor = CLIPImageProcessorPil(do_resize=False, do_center_crop=False)
  ours = np.asarray(jax.jit(preprocess.normalize)(crops))
  for k, crop in enumerate(crops):
    np.testing.assert_allclose(ours[k], hf_pixels(processor, np.ascontiguousarray(crop)), rtol=0, atol=1e-5)
