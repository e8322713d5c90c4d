"""SigLIP parity: tiny random `transformers.SiglipModel`s written by transformers (PyTorch) in the real format
(config.json + model.safetensors), loaded by our loader without torch and compared with transformers' own forward:
image and text features and the logits to 1e-5 relative in float32, bfloat16 within the CLIP tests' bound.

The real checkpoints (google/siglip-base-patch16-224, google/siglip2-base-patch16-224, ...) cannot be downloaded on
the machines these tests run on; the tiny models have the same format and the same code paths."""

from __future__ import annotations

import functools
import json
import pathlib
import re

import jax
import numpy as np
import pytest
import torch
import transformers

from configs import livec_siglip2
from mcpf_jax import aot, clip
from mcpf_jax.clip import checkpoint, siglip

_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
VOCAB = 300
BF16_TOLERANCE = 0.03  # as tests/test_clip_model.py: bf16 towers vs the float32 truth, relative to max |value|


def _hf_config(hidden_act: str = "gelu_pytorch_tanh", image_size: int = 32) -> transformers.SiglipConfig:
  """Tiny SigLIP: text width 32 != vision width 48 would not compare, so the head projects text to 48; depths
  differ (2 vs 3) and heads differ, so a swapped or transposed tensor cannot fit."""
  return transformers.SiglipConfig(
      text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=16, hidden_act=hidden_act,
                       projection_size=48, layer_norm_eps=1e-6),
      vision_config=dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
                         image_size=image_size, patch_size=8, hidden_act=hidden_act, layer_norm_eps=1e-6))


def _perturbed(hf_config, seed: int) -> transformers.SiglipModel:
  """Random weights far from the initialisation (biases, LayerNorms, probe, logit bias all non-trivial)."""
  torch.manual_seed(seed)
  model = transformers.SiglipModel(hf_config).eval()
  gen = torch.Generator().manual_seed(seed)
  model.load_state_dict({k: (0.5 * torch.randn(v.shape, generator=gen) if v.dtype.is_floating_point else v)
                         for k, v in model.state_dict().items()})
  return model


def _inputs(seed: int, image_size: int = 32):
  rng = np.random.default_rng(seed)
  pixels = rng.normal(size=(3, image_size, image_size, 3)).astype(np.float32)
  ids = rng.integers(0, VOCAB, size=(4, 16)).astype(np.int32)  # every row the full 16 positions, as SigLIP pads
  return pixels, ids


def _torch_outputs(model, pixels, ids):
  input_ids = torch.from_numpy(ids.astype(np.int64))
  pixel_values = torch.from_numpy(pixels).permute(0, 3, 1, 2)
  with torch.no_grad():
    image = model.get_image_features(pixel_values=pixel_values)
    text = model.get_text_features(input_ids=input_ids)
    return {"image": image.pooler_output.numpy(), "text": text.pooler_output.numpy(),
            "logits": model(input_ids=input_ids, pixel_values=pixel_values).logits_per_image.numpy(),
            "vision_tokens": image.last_hidden_state.numpy(), "text_tokens": text.last_hidden_state.numpy()}


@functools.partial(_jit, static_argnames=("model",))
def _forward(model, params, pixels, ids):
  variables = {"params": params}
  image, vision_tokens = model.apply(variables, pixels, return_tokens=True, method="encode_image")
  text, text_tokens = model.apply(variables, ids, return_tokens=True, method="encode_text")
  return {"image": image, "text": text, "logits": model.apply(variables, pixels, ids),
          "vision_tokens": vision_tokens, "text_tokens": text_tokens}


def _assert_rel(actual, expected, tol, what):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  err = np.max(np.abs(actual - expected)) / np.max(np.abs(expected))
  assert err < tol, f"{what}: max relative error {err:.3g} >= {tol}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  folder = tmp_path_factory.mktemp("tiny_siglip")
  hf_model = _perturbed(_hf_config(), seed=0)
  hf_model.save_pretrained(folder)
  return folder, hf_model


@pytest.mark.parametrize("scan", [False, True])
def test_matches_transformers_float32(tiny, scan):
  folder, hf_model = tiny
  assert (folder / "model.safetensors").is_file() and json.loads((folder / "config.json").read_text())[
      "model_type"] == "siglip"
  bundle = clip.load(folder).with_compute(scan_layers=scan)  # scan: the same weights, the blocks as lax.scans
  assert isinstance(bundle.model, siglip.SigLIP) and isinstance(bundle.config, siglip.SiglipConfig)
  assert bundle.tokenizer is None and bundle.source.endswith("model.safetensors")
  pixels, ids = _inputs(1)
  ours = jax.device_get(_forward(bundle.model, bundle.params, pixels, ids))
  ref = _torch_outputs(hf_model, pixels, ids)
  for key in ("image", "text", "logits", "vision_tokens", "text_tokens"):
    _assert_rel(ours[key], ref[key], 1e-5, key)
  # The logit bias is real and learned: logits are not exp(scale) * cosine alone.
  assert abs(float(bundle.params["logit_bias"][0]) - float(hf_model.logit_bias.detach())) < 1e-7
  assert abs(float(hf_model.logit_bias.detach())) > 1e-2


def test_bfloat16_within_bound(tiny):
  folder, hf_model = tiny
  bundle = clip.load(folder, dtype="bfloat16", param_dtype="bfloat16")
  pixels, ids = _inputs(2)
  ours = jax.device_get(_forward(bundle.model, bundle.params, pixels, ids))
  ref = _torch_outputs(hf_model, pixels, ids)
  for key in ("image", "text", "logits"):
    _assert_rel(ours[key], ref[key], BF16_TOLERANCE, key)


def test_pooling_reads_the_map_head_and_the_last_text_position(tiny):
  """The image feature is the MAP head's (not the first token, there is no class token); the text feature is the
  last position's, seen by every position (no causal mask): changing the first id changes it."""
  folder, hf_model = tiny
  bundle = clip.load(folder)
  pixels, ids = _inputs(3)
  ours = jax.device_get(_forward(bundle.model, bundle.params, pixels, ids))
  assert ours["vision_tokens"].shape == (3, 16, 48)  # (32 / 8) ** 2 patches, no class token
  changed = ids.copy()
  changed[:, 0] = (changed[:, 0] + 1) % VOCAB
  again = jax.device_get(_forward(bundle.model, bundle.params, pixels, changed))
  assert np.max(np.abs(again["text"] - ours["text"])) > 1e-3
  _assert_rel(again["text"], _torch_outputs(hf_model, pixels, changed)["text"], 1e-5, "text after a change")


def test_gelu_exact_variant_and_an_image_size_off_the_patch_grid(tmp_path):
  """GELU's exact form; and 36 pixels with patches of 8, as So400m/14 takes 384 (not a multiple of 14): 4 x 4
  patches, the last 4 pixel rows and columns unread, as transformers' convolution does."""
  hf_model = _perturbed(_hf_config("gelu", image_size=36), seed=4)
  hf_model.save_pretrained(tmp_path)
  bundle = clip.load(tmp_path)
  assert bundle.config.vision.num_patches == 16
  pixels, ids = _inputs(5, image_size=36)
  ours = jax.device_get(_forward(bundle.model, bundle.params, pixels, ids))
  ref = _torch_outputs(hf_model, pixels, ids)
  for key in ("image", "text", "logits"):
    _assert_rel(ours[key], ref[key], 1e-5, key)


def _expand(text: str) -> list[str]:
  """Shell-style brace expansion ("a{b,c{d,e}}" -> ab, acd, ace) of the README's hub-id list."""
  start = text.find("{")
  if start < 0:
    return [text]
  depth, parts, last = 0, [], start + 1
  for i in range(start, len(text)):
    depth += {"{": 1, "}": -1}.get(text[i], 0)
    if depth == 1 and text[i] == ",":
      parts.append(text[last:i])
      last = i + 1
    if depth == 0:
      parts.append(text[last:i])
      return [x for part in parts for x in _expand(text[:start] + part.strip() + text[i + 1:])]
  raise ValueError(f"unbalanced braces in {text!r}")


def test_hub_configs_are_the_released_configs_and_the_readme_lists_them():
  """The built-in SigLIP 2 shapes (pre-flight, summaries) are what transformers reads from the released config.json
  files (those of base-patch16-512 and so400m-patch14-384 written out here), and the README names exactly them."""
  released = {
      "google/siglip2-base-patch16-512": dict(text_config=dict(vocab_size=256000), vision_config=dict(image_size=512)),
      "google/siglip2-so400m-patch14-384": dict(
          text_config=dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, num_hidden_layers=27,
                           vocab_size=256000),
          vision_config=dict(hidden_size=1152, image_size=384, intermediate_size=4304, num_attention_heads=16,
                             num_hidden_layers=27, patch_size=14))}
  for name, config in released.items():
    assert siglip.HUB_CONFIGS[name] == siglip.SiglipConfig.from_hf(transformers.SiglipConfig(**config).to_dict())
  # The pre-flight builds such a model from these shapes alone (no tokenizer.json: SigLIP reads every position).
  config = livec_siglip2.get_config()
  config.clip.name = "google/siglip2-so400m-patch14-384"
  model, params, _, _, _ = aot.build(config, "tpu")
  assert model.text_span == 64 and model.clip_config.vision.num_patches == 27 * 27
  shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)
  assert shapes(params["clip"]) == shapes(siglip.param_shapes(siglip.HUB_CONFIGS[config.clip.name]))
  readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
  listed = re.search(r"\| SigLIP 2 \(fixed resolution\) \| `(google/siglip2-[^`]*)`", readme).group(1)
  assert sorted(_expand(listed.replace(" ", ""))) == sorted(siglip.HUB_CONFIGS)


def test_bad_folders_are_named(tiny, tmp_path):
  folder, _ = tiny
  config = json.loads((folder / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(dict(config, model_type="siglip2")))
  with pytest.raises(ValueError, match=r"config.json: model_type 'siglip2' is SigLIP 2's NaFlex variant"):
    clip.load(tmp_path)
  no_head = dict(config, vision_config=dict(config["vision_config"], vision_use_head=False))
  (tmp_path / "config.json").write_text(json.dumps(no_head))
  with pytest.raises(ValueError, match=r"config.json: vision_config.vision_use_head is false"):
    clip.load(tmp_path)
  # A CLIP config over SigLIP weights: the tensors that differ are named, and the model the file should be.
  (tmp_path / "config.json").write_text((folder / "config.json").read_text())
  (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
  wrong = dict(config, vision_config=dict(config["vision_config"], hidden_size=64, num_attention_heads=8),
               text_config=dict(config["text_config"], projection_size=64))
  (tmp_path / "config.json").write_text(json.dumps(wrong))
  with pytest.raises(ValueError, match=r"model.safetensors: tensors with the wrong shape: .*vision_model"):
    checkpoint.load_folder(tmp_path)
