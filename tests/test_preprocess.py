"""mcpf_jax.clip.preprocess against transformers' CLIP image processor (PIL backend, no torch needed).

Tolerance: both resize with PIL's bicubic filter on the same uint8 image and crop at the same offsets, so the
uint8 crops are identical; what remains is float32 rounding of the scale and normalisation (|x| < 2.2 after
normalisation, float32 spacing there ~2.4e-7), hence atol 1e-5 (measured: 0.0 on these images). A different
resampler (torchvision, OpenCV) would differ by whole grey levels (~0.015 after normalisation) and fail this test.
"""

import json

import jax
import numpy as np
import pytest
from transformers import CLIPImageProcessorPil

from mcpf_jax.clip import preprocess

ODD_SIZES = [(224, 224), (37, 53), (300, 199), (17, 300), (225, 224), (1000, 333)]


def rgb(h, w, seed=0):
  # Smooth content plus noise, so resampling errors would show.
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w]
  base = np.stack([127 + 100 * np.sin(x / 7.0), 127 + 100 * np.cos(y / 5.0), (x + y) % 256], -1)
  return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def hf_pixels(processor, image):
  out = processor(images=[image], return_tensors="np")["pixel_values"][0]
  return np.moveaxis(out, 0, -1)  # [3, H, W] -> [H, W, 3]


@pytest.mark.parametrize("h,w", ODD_SIZES)
def test_matches_transformers_default(h, w):
  image = rgb(h, w, seed=h * w)
  ours = preprocess.Preprocessor()(image)
  assert ours.shape == (1, 224, 224, 3) and ours.dtype == np.float32
  np.testing.assert_allclose(ours[0], hf_pixels(CLIPImageProcessorPil(), image), rtol=0, atol=1e-5)


def test_from_pretrained_reads_the_config(tmp_path):
  hf = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 48},
                             image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3], resample=2)
  hf.save_pretrained(tmp_path)
  assert json.loads((tmp_path / "preprocessor_config.json").read_text())["size"] == {"shortest_edge": 64}
  ours = preprocess.Preprocessor.from_pretrained(tmp_path)
  assert (ours.size, ours.crop_size, ours.resample) == (64, (56, 48), 2)
  reloaded = CLIPImageProcessorPil.from_pretrained(tmp_path)
  batch = [rgb(h, w, seed=i) for i, (h, w) in enumerate(ODD_SIZES)]
  out = ours(batch)
  assert out.shape == (len(batch), 56, 48, 3)
  for image, row in zip(batch, out):
    np.testing.assert_allclose(row, hf_pixels(reloaded, image), rtol=0, atol=1e-5)


def test_legacy_int_sizes_and_switches(tmp_path):
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(
      {"size": 32, "crop_size": 30, "do_normalize": False, "do_center_crop": True}))
  ours = preprocess.Preprocessor.from_pretrained(tmp_path)
  assert (ours.size, ours.crop_size, ours.mean) == (32, (30, 30), None)
  out = ours(rgb(40, 80))
  assert out.shape == (1, 30, 30, 3) and out.min() >= 0.0 and out.max() <= 1.0


def test_defaults_without_config_and_errors(tmp_path):
  assert preprocess.Preprocessor.from_pretrained(tmp_path) == preprocess.Preprocessor()
  with pytest.raises(FileNotFoundError, match="missing"):
    preprocess.Preprocessor.from_pretrained(tmp_path / "missing")
  (tmp_path / "preprocessor_config.json").write_text("{not json")
  with pytest.raises(ValueError, match="preprocessor_config.json"):
    preprocess.Preprocessor.from_pretrained(tmp_path)
  (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"longest_edge": 300}}))
  with pytest.raises(ValueError, match="size"):
    preprocess.Preprocessor.from_pretrained(tmp_path)


def test_normalize_in_jit_matches_transformers_on_a_crop():
  crop = rgb(224, 224, seed=5)  # already crop-sized: the processor only rescales and normalises
  ours = jax.jit(preprocess.normalize)(crop[None])
  assert ours.dtype == np.float32 and ours.shape == (1, 224, 224, 3)
  np.testing.assert_allclose(np.asarray(ours[0]), hf_pixels(CLIPImageProcessorPil(), crop), rtol=0, atol=1e-5)
