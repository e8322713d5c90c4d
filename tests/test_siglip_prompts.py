"""Prompts and heads on a SigLIP backbone, against transformers' PyTorch `SiglipModel` where a reference exists.

A tiny random SigLIP written by transformers in the real format, with a SigLIP 2-format tokenizer.json built here (the
real files cannot be downloaded on the machines these tests run on; tests/siglip_support.py)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from siglip_support import write_tiny_siglip

from configs import base
from mcpf_jax import clip
from mcpf_jax import model as model_lib
from mcpf_jax.clip import preprocess

_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  folder = tmp_path_factory.mktemp("tiny_siglip_prompts")
  return folder, write_tiny_siglip(folder, seed=1)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / np.max(np.abs(b))


def test_zero_shot_logits_are_siglips_own(tiny):
  """clipiqa on SigLIP: the quality logits are transformers' logits_per_image (bias included) for the tokenizer's
  ids of "Good photo." / "Bad photo." and the same crops in SigLIP's normalisation (the model gets CLIP's); the
  score reads them by softmax or, with model.class_probs="sigmoid", by normalised sigmoids."""
  folder, hf_model = tiny
  bundle = clip.load(folder)
  rng = np.random.default_rng(0)
  crops = rng.integers(0, 256, size=(3, 32, 32, 3)).astype(np.uint8)
  outs = {}
  for probs in ("softmax", "sigmoid"):
    cfg = base.get_config().model
    cfg.name, cfg.class_probs = "clipiqa", probs
    model, params = model_lib.build(cfg, bundle, jax.random.key(0))
    outs[probs] = jax.device_get(_jit(model.apply)({"params": params}, preprocess.normalize(crops)))
  ids = bundle.tokenizer(["Bad photo.", "Good photo."])
  assert ids.shape == (2, 64)
  pixel_values = torch.from_numpy((crops / 255.0 - 0.5) / 0.5).float().permute(0, 3, 1, 2)
  with torch.no_grad():
    want = hf_model(input_ids=torch.from_numpy(ids.astype(np.int64)), pixel_values=pixel_values).logits_per_image
  want = want.numpy()
  assert _rel(outs["softmax"]["quality_logits"], want) < 1e-5
  assert abs(float(hf_model.logit_bias.detach())) > 0.1  # the bias is there to be missed
  soft = np.exp(want - want.max(-1, keepdims=True))
  np.testing.assert_allclose(outs["softmax"]["score"], (soft / soft.sum(-1, keepdims=True)) @ [1, 2], rtol=1e-5)
  sig = 1 / (1 + np.exp(-want))
  np.testing.assert_allclose(outs["sigmoid"]["score"], (sig / sig.sum(-1, keepdims=True)) @ [1, 2], rtol=1e-5)


def test_text_prompts_take_the_first_positions(tiny):
  """With no start token, layer-0 text prompts replace positions 0..n-1: prompts equal to the embeddings of some ids
  give transformers' features of those ids written there."""
  folder, hf_model = tiny
  bundle = clip.load(folder)
  tok = bundle.tokenizer
  placeholder = tok(["x x x x good quality."])
  real = tok(["a photo of a good quality."])
  n = 4
  assert len(tok.encode("a photo of a")) == n and np.all(placeholder[:, n:] == real[:, n:])
  table = bundle.params["text_model"]["embeddings"]["token_embedding"]["embedding"]
  prompt = jnp.asarray(np.asarray(table)[real[0, :n]])
  ours = bundle.model.apply({"params": bundle.params}, placeholder, [prompt], method="encode_text")
  with torch.no_grad():
    want = hf_model.get_text_features(input_ids=torch.from_numpy(real.astype(np.int64))).pooler_output.numpy()
  assert _rel(ours, want) < 1e-5


def test_visual_prompts_act_through_attention_and_are_pooled_only_on_request(tiny):
  folder, _ = tiny
  bundle = clip.load(folder)
  pixels = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
  prompts = [jnp.asarray(np.random.default_rng(2).normal(size=(3, 48)), jnp.float32)] * 2
  plain = bundle.model.apply({"params": bundle.params}, pixels, method="encode_image")
  prompted, tokens = bundle.model.apply({"params": bundle.params}, pixels, prompts, True, method="encode_image")
  pooled_too = clip.siglip.SigLIP(bundle.config, pool_prompts=True).apply(
      {"params": bundle.params}, pixels, prompts, method="encode_image")
  assert tokens.shape == (2, 16 + 3, 48)
  assert _rel(prompted, plain) > 1e-3 and _rel(pooled_too, prompted) > 1e-3


def test_scanned_layers_give_the_same_mcpf_scores(tiny):
  """clip.scan_layers on a SigLIP backbone (text prompts at positions 0..n-1, no class token): MCPF's scores and
  logits within 1e-5 of the unrolled towers', with the same parameter tree."""
  folder, _ = tiny
  bundle = clip.load(folder)
  crops = preprocess.normalize(np.random.default_rng(3).integers(0, 256, size=(2, 32, 32, 3)).astype(np.uint8))
  outs = []
  for scan in (False, True):
    model, params = model_lib.build(base.get_config().model, bundle.with_compute(scan_layers=scan),
                                    jax.random.key(0))
    outs.append((jax.tree.structure(params), jax.device_get(_jit(model.apply)({"params": params}, crops))))
  (tree, ref), (scanned_tree, got) = outs
  assert scanned_tree == tree
  for k in ref:
    assert _rel(got[k], ref[k]) <= 1e-5, k
