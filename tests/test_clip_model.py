"""Parity of mcpf_jax.clip with transformers' PyTorch CLIPModel (an independent implementation).

Every model is tiny and has EVERY tensor replaced by normal noise (LayerNorm weights and biases and
logit_scale included), so a wrong layout, a missing LayerNorm, a wrong activation or a wrong pooling
position changes the outputs. The prompt hooks are checked against transformers' own modules run layer by
layer with the same prompt tensors written in by hand.
"""

from __future__ import annotations

import copy
import functools
import json
import pathlib
import shutil

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from mcpf_jax import clip
from mcpf_jax.clip import checkpoint
from mcpf_jax.clip import config as config_lib
from mcpf_jax.clip import init as init_lib
from mcpf_jax.clip import layers as layers_lib
from mcpf_jax.clip import model as model_lib

pytestmark = pytest.mark.torch

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "clip_flax_tiny"
VOCAB = 1000
# bfloat16 towers vs the float32 truth, max error relative to the largest |value| (8 bits of mantissa through
# 2-3 perturbed layers; measured 0.6-1.2e-2 for ours and 0.8-0.9e-2 for transformers' bf16).
BF16_TOLERANCE = 0.03
# The tests compile many tiny graphs on a shared 2-core CPU: skipping LLVM's optimisations makes each compile
# ~3x faster. It only changes how XLA's CPU backend generates code, not the computation.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _hf_config(hidden_act: str = "quick_gelu", eos_token_id: int = 500, layers: int = 2,
               vocab_size: int = VOCAB) -> transformers.CLIPConfig:
  """Tiny CLIP; text and vision widths differ so that a transposed or swapped tensor cannot fit."""
  bos = 0 if eos_token_id == 2 else eos_token_id - 1
  return transformers.CLIPConfig(
      text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                       num_attention_heads=4, hidden_act=hidden_act, eos_token_id=eos_token_id,
                       bos_token_id=bos, pad_token_id=1, layer_norm_eps=1e-5),
      vision_config=dict(hidden_size=48, intermediate_size=80, num_hidden_layers=layers + 1,
                         num_attention_heads=4, image_size=32, patch_size=8, hidden_act=hidden_act,
                         layer_norm_eps=1e-6),
      projection_dim=24)


def _perturbed(hf_config: transformers.CLIPConfig, seed: int) -> transformers.CLIPModel:
  torch.manual_seed(seed)
  model = transformers.CLIPModel(hf_config).eval()
  gen = torch.Generator().manual_seed(seed)
  model.load_state_dict({k: (0.5 * torch.randn(v.shape, generator=gen) if v.dtype.is_floating_point else v)
                         for k, v in model.state_dict().items()})
  return model


def _inputs(seed: int, eos: int, vocab: int = VOCAB, legacy: bool = False):
  """pixels [3, 32, 32, 3] float32 and ids [4, 77] int32 with end-of-text at varied positions.

  New-style rows repeat the end-of-text id as padding and hold ids larger than it before it, so pooling at
  argmax(ids) and at the first end-of-text token give different answers. Legacy rows end with the largest
  id of the row, as the real tokenizer's <|endoftext|> is.
  """
  rng = np.random.default_rng(seed)
  pixels = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
  ids = rng.integers(3, vocab - 1, size=(4, 77))
  ids[:, 0] = 0
  end_token = vocab - 1 if legacy else eos
  for row, end in enumerate((6, 15, 40, 76)):
    ids[row, end] = end_token
    ids[row, end + 1:] = 1 if legacy else eos
  return pixels, ids.astype(np.int32)


def _torch_outputs(model: transformers.CLIPModel, pixels: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
  input_ids = torch.from_numpy(ids.astype(np.int64))
  pixel_values = torch.from_numpy(pixels).permute(0, 3, 1, 2)
  with torch.no_grad():
    # In transformers 5 the get_*_features outputs carry the projected features as pooler_output.
    image = model.get_image_features(pixel_values=pixel_values)
    text = model.get_text_features(input_ids=input_ids)
    return {
        "image": image.pooler_output.numpy(),
        "text": text.pooler_output.numpy(),
        "logits": model(input_ids=input_ids, pixel_values=pixel_values).logits_per_image.numpy(),
        "vision_tokens": image.last_hidden_state.numpy(),
        "text_tokens": text.last_hidden_state.numpy(),
    }


def _assert_rel(actual, expected, tol: float = 1e-5, what: str = "") -> None:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  err = np.max(np.abs(actual - expected)) / np.max(np.abs(expected))
  assert err < tol, f"{what}: max relative error {err:.3g} >= {tol}"


@functools.partial(_jit, static_argnames=("model", "method", "return_tokens", "interpolate_pos_encoding"))
def _apply(model, params, *args, method=None, **kwargs):
  """`model.apply` under jit (op-by-op eager dispatch compiles every op: slower than one compile)."""
  return model.apply({"params": params}, *args, method=method, **kwargs)


@functools.partial(_jit, static_argnames=("model",))
def _forward(model, params, pixels, ids) -> dict[str, jax.Array]:
  """Both towers in one compiled function (each compile costs seconds on a loaded 2-core CPU)."""
  variables = {"params": params}
  image, vision_tokens = model.apply(variables, pixels, return_tokens=True, method="encode_image")
  text, text_tokens = model.apply(variables, ids, return_tokens=True, method="encode_text")
  return {"image": image, "text": text, "logits": model_lib.logits(image, text, params["logit_scale"]),
          "vision_tokens": vision_tokens, "text_tokens": text_tokens}


def _ours(bundle: clip.Bundle, pixels, ids) -> dict[str, np.ndarray]:
  return _forward(bundle.model, bundle.params, pixels, ids)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A perturbed 2-layer text / 3-layer vision CLIP saved by transformers, and loaded by us."""
  hf_model = _perturbed(_hf_config(layers=2), seed=3)
  folder = tmp_path_factory.mktemp("tiny_clip")
  hf_model.save_pretrained(folder)
  return hf_model, folder, clip.load(folder)


# --- Parity with transformers -----------------------------------------------------------------------------


@pytest.mark.parametrize("hidden_act,eos_token_id,scan", [("quick_gelu", 2, False), ("quick_gelu", 500, True),
                                                          ("gelu", 2, False), ("gelu", 500, False)])
def test_matches_transformers(tmp_path, hidden_act, eos_token_id, scan):
  # Other weights than the `tiny` fixture's, same sizes (so compiled functions are shared between tests).
  hf_model = _perturbed(_hf_config(hidden_act, eos_token_id), seed=11)
  hf_model.save_pretrained(tmp_path)
  assert (tmp_path / "model.safetensors").is_file()
  bundle = clip.load(tmp_path).with_compute(scan_layers=scan)  # scan: the same weights, the blocks as lax.scans
  assert bundle.config.text.hidden_act == hidden_act and bundle.config.text.eos_token_id == eos_token_id
  pixels, ids = _inputs(seed=5, eos=eos_token_id, legacy=eos_token_id == 2)
  ref = _torch_outputs(hf_model, pixels, ids)
  ours = _ours(bundle, pixels, ids)
  for key in ref:
    _assert_rel(ours[key], ref[key], what=key)
  # Zero-shot sanity: the same choice of text for every image.
  np.testing.assert_array_equal(np.argmax(ours["logits"], 1), np.argmax(ref["logits"], 1))


def test_call_gives_logits_per_image(tiny):
  hf_model, _, bundle = tiny
  pixels, ids = _inputs(seed=7, eos=500)
  logits = _apply(bundle.model, bundle.params, pixels, ids)
  _assert_rel(logits, _torch_outputs(hf_model, pixels, ids)["logits"], what="logits_per_image")


def test_pooling_rule_follows_eos_token_id(tiny):
  """The same ids pool at different positions under the legacy (eos == 2) and the new rule."""
  _, _, bundle = tiny
  _, ids = _inputs(seed=5, eos=500)
  new = _apply(bundle.model, bundle.params, ids, method="encode_text")
  legacy_cfg = bundle.config.replace(text=bundle.config.text.__class__(
      **{**bundle.config.text.__dict__, "eos_token_id": 2}))
  legacy = _apply(model_lib.CLIP(legacy_cfg), bundle.params, ids, method="encode_text")
  assert np.max(np.abs(np.asarray(new) - np.asarray(legacy))) > 1e-3


def test_our_save_pretrained_loads_in_transformers(tmp_path):
  cfg = clip.CLIPConfig.from_hf(_hf_config("gelu", 500).to_dict())
  shapes = init_lib.param_shapes(cfg)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32) * 0.3,
                        clip.init_random(cfg, seed=1))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(lambda x: (x.shape, x.dtype), shapes)
  clip.save_pretrained(tmp_path, params, cfg)
  config_json = json.loads((tmp_path / "config.json").read_text())
  assert config_json["architectures"] == ["CLIPModel"] and config_json["model_type"] == "clip"
  hf_model, info = transformers.CLIPModel.from_pretrained(tmp_path, output_loading_info=True)
  assert not any(info.values()), info  # no missing, unexpected or mismatched keys
  hf_model.eval()
  pixels, ids = _inputs(seed=2, eos=500)
  ref = _torch_outputs(hf_model, pixels, ids)
  model = clip.CLIP(cfg)
  ours = _ours(clip.Bundle(model, params, None, cfg, "", ""), pixels, ids)
  for key in ref:
    _assert_rel(ours[key], ref[key], what=key)
  reloaded = clip.load(tmp_path)
  assert reloaded.fingerprint == clip.fingerprint(params)
  assert reloaded.config == cfg


# --- The HF Flax checkpoint (flax_model.msgpack written by transformers 4.57.1) ---------------------------


def test_flax_msgpack_fixture(tmp_path):
  assert sorted(p.name for p in FIXTURE.iterdir()) == ["config.json", "flax_model.msgpack", "reference.npz"]
  ref = np.load(FIXTURE / "reference.npz")
  bundle = clip.load(FIXTURE)
  assert bundle.source.endswith("flax_model.msgpack")
  assert bundle.config.text.legacy_eos_pooling
  ours = _ours(bundle, ref["pixels"], ref["input_ids"])
  # PyTorch CLIPModel (transformers 4.57.1) outputs stored by make_flax_msgpack.py.
  _assert_rel(ours["image"], ref["image_embeds"], what="image")
  _assert_rel(ours["text"], ref["text_embeds"], what="text")
  _assert_rel(ours["logits"], ref["logits_per_image"], what="logits")
  _assert_rel(ours["vision_tokens"], ref["vision_last_hidden_state"], what="vision tokens")
  _assert_rel(ours["text_tokens"], ref["text_last_hidden_state"], what="text tokens")
  # And transformers' own Flax CLIP on the same checkpoint.
  _assert_rel(ours["image"], ref["flax_image_embeds"], what="image vs HF Flax")
  _assert_rel(ours["text"], ref["flax_text_embeds"], what="text vs HF Flax")

  # The same weights through safetensors: transformers 5's CLIPModel reads them and agrees with 4.57's.
  clip.save_pretrained(tmp_path, bundle.params, bundle.config)
  hf_model = transformers.CLIPModel.from_pretrained(tmp_path).eval()
  torch_now = _torch_outputs(hf_model, ref["pixels"], ref["input_ids"])
  _assert_rel(torch_now["image"], ref["image_embeds"], what="transformers 5 image")
  _assert_rel(torch_now["text"], ref["text_embeds"], what="transformers 5 text")
  # msgpack -> safetensors -> our loader gives back the same values.
  assert clip.load(tmp_path).fingerprint == bundle.fingerprint


def test_safetensors_preferred_over_msgpack(tmp_path):
  shutil.copytree(FIXTURE, tmp_path, dirs_exist_ok=True)
  bundle = clip.load(FIXTURE)
  clip.save_pretrained(tmp_path, jax.tree.map(lambda x: x * 2, bundle.params), bundle.config)
  both = clip.load(tmp_path)
  assert both.source.endswith("model.safetensors") and both.fingerprint != bundle.fingerprint


# --- Prompts ----------------------------------------------------------------------------------------------


def _torch_text_with_prompts(hf_model, ids: np.ndarray, prompts) -> tuple[np.ndarray, np.ndarray]:
  """transformers' text modules, layer by layer, with the prompt tensors written in by hand."""
  tm = hf_model.text_model
  batch, tokens = ids.shape

  def put(x, p):
    p = torch.from_numpy(np.asarray(p))
    p = p.expand(batch, -1, -1) if p.ndim == 2 else p
    x = x.clone()
    x[:, 1:1 + p.shape[1]] = p
    return x

  with torch.no_grad():
    x = tm.embeddings.token_embedding(torch.from_numpy(ids.astype(np.int64)))
    x = put(x, prompts[0])
    x = x + tm.embeddings.position_embedding(torch.arange(tokens))[None]
    causal = torch.full((tokens, tokens), float("-inf")).triu(1)[None, None]
    for i, layer in enumerate(tm.encoder.layers):
      if 1 <= i < len(prompts):
        x = put(x, prompts[i])
      x = layer(x, causal)
    x = tm.final_layer_norm(x)
    eos = hf_model.config.text_config.eos_token_id
    pos = ids.argmax(-1) if eos == 2 else (ids == eos).argmax(-1)
    return hf_model.text_projection(x[torch.arange(batch), torch.from_numpy(pos)]).numpy(), x.numpy()


def _torch_vision_with_prompts(hf_model, pixels: np.ndarray, prompts) -> tuple[np.ndarray, np.ndarray]:
  vm = hf_model.vision_model
  batch = pixels.shape[0]

  def batched(p):
    p = torch.from_numpy(np.asarray(p))
    return p.expand(batch, -1, -1) if p.ndim == 2 else p

  with torch.no_grad():
    x = vm.embeddings(torch.from_numpy(pixels).permute(0, 3, 1, 2))
    x = torch.cat([x, batched(prompts[0])], dim=1)
    x = vm.pre_layrnorm(x)
    for i, layer in enumerate(vm.encoder.layers):
      if 1 <= i < len(prompts):
        p = batched(prompts[i])
        x = torch.cat([x[:, :-p.shape[1]], p], dim=1)
      x = layer(x, None)
    pooled = vm.post_layernorm(x[:, 0])
    return hf_model.visual_projection(pooled).numpy(), x.numpy()


def _prompts(rng, batch: int, n: int, width: int, count: int) -> list[np.ndarray]:
  """Alternate shared [n, width] and per-example [batch, n, width] prompts."""
  return [(0.5 * rng.normal(size=(n, width) if j % 2 == 0 else (batch, n, width))).astype(np.float32)
          for j in range(count)]


@pytest.mark.parametrize("count,scan", [(1, False), (2, False), (2, True)])
def test_text_prompts_match_manual_transformers(tiny, count, scan):
  hf_model, _, bundle = tiny
  bundle = bundle.with_compute(scan_layers=scan)
  _, ids = _inputs(seed=8, eos=500)
  prompts = _prompts(np.random.default_rng(count), ids.shape[0], n=4, width=32, count=count)
  ref, ref_tokens = _torch_text_with_prompts(hf_model, ids, prompts)
  ours, tokens = _apply(bundle.model, bundle.params, ids, prompts, return_tokens=True,
                                    method="encode_text")
  _assert_rel(ours, ref, what="text features")
  _assert_rel(tokens, ref_tokens, what="text tokens")
  plain = _apply(bundle.model, bundle.params, ids, method="encode_text")
  assert np.max(np.abs(np.asarray(plain) - ref)) > 1e-3  # the prompts did change something


@pytest.mark.parametrize("count,scan", [(1, False), (3, False), (3, True)])
def test_vision_prompts_match_manual_transformers(tiny, count, scan):
  hf_model, _, bundle = tiny
  bundle = bundle.with_compute(scan_layers=scan)
  pixels, _ = _inputs(seed=9, eos=500)
  prompts = _prompts(np.random.default_rng(10 + count), pixels.shape[0], n=3, width=48, count=count)
  ref, ref_tokens = _torch_vision_with_prompts(hf_model, pixels, prompts)
  ours, tokens = _apply(bundle.model, bundle.params, pixels, prompts, return_tokens=True,
                                    method="encode_image")
  assert tokens.shape == (3, 1 + 16 + 3, 48)
  _assert_rel(ours, ref, what="image features")
  _assert_rel(tokens, ref_tokens, what="vision tokens")


@functools.partial(_jit, static_argnames=("model",))
def _prompt_loss_and_grad(model, params, prompts, pixels, ids):
  """A zero-shot cross-entropy through `__call__` with prompts in both towers, and its prompt gradient."""
  def loss(prompts):
    logits = model.apply({"params": params}, pixels, ids, image_prompts=prompts["image"],
                         text_prompts=prompts["text"])
    return jnp.sum(jax.nn.log_softmax(logits, axis=-1)[:, 0])
  return jax.value_and_grad(loss)(prompts)


def _grad_case(bundle):
  pixels, ids = _inputs(seed=4, eos=500)
  rng = np.random.default_rng(0)
  prompts = {"image": [jnp.asarray(p) for p in _prompts(rng, 3, n=2, width=48, count=3)],
             "text": [jnp.asarray(p) for p in _prompts(rng, 4, n=4, width=32, count=2)]}
  return prompts, pixels, ids


def test_prompts_jit_and_grad(tiny):
  _, _, bundle = tiny
  prompts, pixels, ids = _grad_case(bundle)
  value, grads = _prompt_loss_and_grad(bundle.model, bundle.params, prompts, pixels, ids)
  assert np.isfinite(value)
  for tower in ("image", "text"):
    for j, g in enumerate(grads[tower]):
      assert g.shape == prompts[tower][j].shape
      assert float(jnp.max(jnp.abs(g))) > 0, f"no gradient reaches {tower} prompt {j}"
  # Central finite difference along the gradient of a deep prompt of each tower.
  for tower, j in (("image", 2), ("text", 1)):
    norm = jnp.linalg.norm(grads[tower][j])
    eps = 1e-2

    def moved(sign):
      changed = {k: list(v) for k, v in prompts.items()}
      changed[tower][j] = prompts[tower][j] + sign * eps * grads[tower][j] / norm
      return _prompt_loss_and_grad(bundle.model, bundle.params, changed, pixels, ids)[0]

    numeric = (moved(1.0) - moved(-1.0)) / (2 * eps)
    np.testing.assert_allclose(numeric, norm, rtol=0.02)


@pytest.mark.parametrize("remat,scan", [(True, False), (False, True), (True, True)])
def test_remat_and_scan_give_same_values_and_grads(tiny, remat, scan):
  _, _, bundle = tiny
  prompts, pixels, ids = _grad_case(bundle)
  # Scanned: inside the image-chunk scan too (3 images in chunks of 2), as a CPU batch larger than a chunk runs.
  remat = clip.CLIP(bundle.config.replace(remat=remat, scan_layers=scan, image_chunk=2 if scan else None))
  v0, g0 = _prompt_loss_and_grad(bundle.model, bundle.params, prompts, pixels, ids)
  v1, g1 = _prompt_loss_and_grad(remat, bundle.params, prompts, pixels, ids)
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_scanned_stack_matches_the_loop():
  """LayerStack.scan against the Python loop over the same per-layer weights: prompts in every slot, prompts whose
  token counts differ between layers (those blocks then run one at a time), the CLS-only last block, and a
  parameter tree that is the same, layer by layer, as the loop's (what checkpoints and export see)."""
  cfg = config_lib.CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=5, num_attention_heads=2)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 9, 16)), jnp.float32)
  loop = layers_lib.Encoder(cfg, False, "last")
  params = loop.init(jax.random.key(0), x)
  scanned = loop.clone(scan=True)
  assert jax.tree.structure(scanned.init(jax.random.key(0), x)) == jax.tree.structure(params)
  assert sorted(params["params"]["layers"]) == ["0", "1", "2", "3", "4"]
  same = [jnp.asarray(rng.normal(size=(3, 16)), jnp.float32) for _ in range(3)]
  mixed = [same[0], jnp.broadcast_to(same[1], (2, 3, 16)), jnp.asarray(rng.normal(size=(2, 16)), jnp.float32)]
  run = _jit(lambda m, p, prompts, queries: m.apply({"params": p}, x, prompts, queries), static_argnums=(0, 3))
  cases = [("after_first", (), None), ("after_first", same, None), ("after_first", mixed[:2], None),
           ("after_first", mixed, None), ("first", same, None), ("last", same, 1), ("last", same[:1] * 4, 1)]
  for slot, prompts, queries in cases:
    want = run(loop.clone(prompt_slot=slot), params["params"], prompts, queries)
    for remat in (False, True):
      got = run(scanned.clone(prompt_slot=slot, remat=remat), params["params"], prompts, queries)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{slot} {len(prompts)} {queries}")


def test_prompt_shape_errors(tiny):
  _, _, bundle = tiny
  pixels, ids = _inputs(seed=4, eos=500)
  p = {"params": bundle.params}
  with pytest.raises(ValueError, match=r"text prompts\[0\] has shape \(4, 48\)"):
    bundle.model.apply(p, ids, [np.zeros((4, 48), np.float32)], method="encode_text")
  with pytest.raises(ValueError, match="3 prompt sets for 2 layers"):
    bundle.model.apply(p, ids, [np.zeros((4, 32), np.float32)] * 3, method="encode_text")
  with pytest.raises(ValueError, match=r"text prompts\[1\] has 76 tokens; only 75 fit"):
    bundle.model.apply(p, ids, [np.zeros((4, 32), np.float32), np.zeros((76, 32), np.float32)],
                       method="encode_text")
  with pytest.raises(ValueError, match=r"\[3, n, 48\]"):
    bundle.model.apply(p, pixels, [np.zeros((5, 2, 48), np.float32)], method="encode_image")
  with pytest.raises(ValueError, match="as many tokens as prompts"):
    bundle.model.apply(p, pixels, [np.zeros((2, 48), np.float32), np.zeros((3, 48), np.float32)],
                       method="encode_image")


# --- Compute dtype, input size ----------------------------------------------------------------------------


def test_bfloat16_close_to_float32(tiny):
  _, folder, bundle = tiny
  bf16 = clip.load(folder, dtype="bfloat16")
  assert bf16.config.dtype == "bfloat16"
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf16.params))
  assert bf16.fingerprint == bundle.fingerprint
  pixels, ids = _inputs(seed=6, eos=500)
  f32, low = _forward(bundle.model, bundle.params, pixels, ids), _forward(bf16.model, bf16.params, pixels, ids)
  assert low["vision_tokens"].dtype == low["text_tokens"].dtype == jnp.bfloat16
  for key in ("image", "text"):
    assert low[key].dtype == jnp.float32
    a, b = np.asarray(f32[key]), np.asarray(low[key])
    cos = np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert np.all(cos > 0.99), (key, cos)
    _assert_rel(b, a, tol=0.1, what=f"bfloat16 {key}")


def test_other_input_size_needs_interpolation(tiny):
  _, _, bundle = tiny
  p = {"params": bundle.params}
  big = np.random.default_rng(0).normal(size=(2, 48, 48, 3)).astype(np.float32)
  with pytest.raises(ValueError, match="interpolate_pos_encoding"):
    bundle.model.apply(p, big, method="encode_image")
  features, tokens = _apply(bundle.model, bundle.params, big, return_tokens=True, interpolate_pos_encoding=True,
                            method="encode_image")
  assert features.shape == (2, 24) and tokens.shape == (2, 1 + 36, 48)
  assert np.all(np.isfinite(features))
  native, _ = _inputs(seed=1, eos=500)
  np.testing.assert_array_equal(
      _apply(bundle.model, bundle.params, native, interpolate_pos_encoding=True, method="encode_image"),
      _apply(bundle.model, bundle.params, native, method="encode_image"))


# --- Checkpoint errors ------------------------------------------------------------------------------------


def _write_tensors(folder: pathlib.Path, src: pathlib.Path, tensors: dict[str, np.ndarray]) -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  shutil.copy(src / "config.json", folder / "config.json")
  safetensors.numpy.save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
  return folder


def test_safetensors_errors_name_tensors_and_file(tiny, tmp_path):
  _, src, bundle = tiny
  tensors = safetensors.numpy.load_file(str(src / "model.safetensors"))
  key = "text_model.encoder.layers.1.mlp.fc1.weight"

  # position_ids buffers of older checkpoints are ignored, and only those.
  with_buffers = dict(tensors, **{"text_model.embeddings.position_ids": np.arange(77)[None],
                                  "vision_model.embeddings.position_ids": np.arange(17)[None]})
  ok = clip.load(_write_tensors(tmp_path / "buffers", src, with_buffers))
  assert ok.fingerprint == bundle.fingerprint

  missing = {k: v for k, v in tensors.items() if k != key}
  with pytest.raises(ValueError, match=rf"missing tensors \['{key}'\]") as e:
    clip.load(_write_tensors(tmp_path / "missing", src, missing))
  assert str(tmp_path / "missing" / "model.safetensors") in str(e.value)

  unknown = dict(tensors, **{"text_model.extra.weight": np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match=r"unknown tensors \['text_model.extra.weight'\]"):
    clip.load(_write_tensors(tmp_path / "unknown", src, unknown))

  misshaped = dict(tensors, **{key: tensors[key].T.copy()})
  with pytest.raises(ValueError, match=rf"{key} is \[32, 64\], expected \[64, 32\]") as e:
    clip.load(_write_tensors(tmp_path / "shape", src, misshaped))
  assert "model.safetensors" in str(e.value)


def test_msgpack_errors_name_tensors_and_file(tmp_path):
  tree = flax.serialization.msgpack_restore((FIXTURE / "flax_model.msgpack").read_bytes())
  del tree["vision_model"]["post_layernorm"]["scale"]
  tree["text_model"]["bogus"] = {"kernel": np.zeros((2, 2), np.float32)}
  tree["visual_projection"]["kernel"] = np.zeros((24, 48), np.float32)
  shutil.copy(FIXTURE / "config.json", tmp_path / "config.json")
  (tmp_path / "flax_model.msgpack").write_bytes(flax.serialization.msgpack_serialize(tree))
  with pytest.raises(ValueError) as e:
    clip.load(tmp_path)
  msg = str(e.value)
  assert str(tmp_path / "flax_model.msgpack") in msg
  assert "vision_model/post_layernorm/scale" in msg and "text_model/bogus/kernel" in msg
  del tree["text_model"]["bogus"]
  tree["vision_model"]["post_layernorm"]["scale"] = np.ones(48, np.float32)
  (tmp_path / "flax_model.msgpack").write_bytes(flax.serialization.msgpack_serialize(tree))
  with pytest.raises(ValueError, match=r"visual_projection/kernel is \[24, 48\], expected \[48, 24\]"):
    clip.load(tmp_path)


def test_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    clip.load(tmp_path)
  shutil.copy(FIXTURE / "config.json", tmp_path / "config.json")
  with pytest.raises(FileNotFoundError, match="model.safetensors or flax_model.msgpack"):
    clip.load(tmp_path)
  cfg = json.loads((FIXTURE / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(dict(cfg, model_type="blip")))
  with pytest.raises(ValueError, match="model_type is 'blip', expected 'clip'"):
    clip.load(tmp_path)
  # A SigLIP config.json over CLIP weights (this fixture's msgpack): read as a SiglipModel, whose tensors the file
  # does not hold.
  shutil.copy(FIXTURE / "flax_model.msgpack", tmp_path / "flax_model.msgpack")
  text = dict(cfg["text_config"], projection_size=cfg["vision_config"]["hidden_size"])
  (tmp_path / "config.json").write_text(json.dumps(dict(cfg, model_type="siglip", text_config=text)))
  with pytest.raises(ValueError, match=r"missing tensors .*vision_model/head/probe.* \(expected a SiglipModel "
                     r"checkpoint matching config.json\)"):
    clip.load(tmp_path)


# --- Hub cache --------------------------------------------------------------------------------------------


def test_hub_id_from_offline_cache(tiny, tmp_path, monkeypatch):
  """A hub snapshot laid out as huggingface_hub caches it loads offline; an uncached one fails clearly."""
  import huggingface_hub  # pylint: disable=import-outside-toplevel

  _, src, bundle = tiny
  commit = "0123456789abcdef0123456789abcdef01234567"
  repo = tmp_path / "models--tiny-org--tiny-clip"
  (repo / "refs").mkdir(parents=True)
  (repo / "refs" / "main").write_text(commit)
  shutil.copytree(src, repo / "snapshots" / commit)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  loaded = clip.load("tiny-org/tiny-clip", cache_dir=str(tmp_path))
  assert loaded.source == f"hf://tiny-org/tiny-clip@{commit}/model.safetensors"
  assert loaded.fingerprint == bundle.fingerprint
  with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set"):
    clip.load("tiny-org/not-cached", cache_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set"):
    clip.load("vit-b-16", cache_dir=str(tmp_path))  # the preset's hub repo, not cached here


# --- Tokenizer in the bundle ------------------------------------------------------------------------------


def test_bundle_with_real_tokenizer(tmp_path):
  tokenizer_lib = pytest.importorskip("mcpf_jax.clip.tokenizer")
  hf_config = _hf_config("quick_gelu", 49407, vocab_size=49408)
  hf_model = _perturbed(hf_config, seed=21)
  hf_model.save_pretrained(tmp_path)
  assert clip.load(tmp_path).tokenizer is None
  tokenizer_lib.write_tokenizer_files(tmp_path)
  bundle = clip.load(tmp_path)
  assert isinstance(bundle.tokenizer, tokenizer_lib.Tokenizer)
  ids = bundle.tokenizer(["a photo of a cat", "X X X X blurry photo."])
  assert ids.shape == (2, 77) and ids.dtype == np.int32
  ours = _apply(bundle.model, bundle.params, ids, method="encode_text")
  with torch.no_grad():
    ref = hf_model.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64))).pooler_output.numpy()
  _assert_rel(ours, ref)


# --- Config -----------------------------------------------------------------------------------------------


def test_config_round_trip_through_transformers():
  cfg = clip.CLIPConfig.from_hf(_hf_config("gelu", 2).to_dict(), dtype="bfloat16", remat=True)
  assert (cfg.text.hidden_size, cfg.vision.hidden_size, cfg.projection_dim) == (32, 48, 24)
  assert (cfg.vision.layer_norm_eps, cfg.text.eos_token_id, cfg.dtype, cfg.remat) == (1e-6, 2, "bfloat16", True)
  hf = transformers.CLIPConfig(**cfg.to_hf())
  assert clip.CLIPConfig.from_hf(hf.to_dict(), dtype="bfloat16", remat=True) == cfg
  assert clip.CLIPConfig.from_hf(cfg.to_hf()) == cfg.replace(dtype="float32", remat=False)


def test_config_legacy_dict_entries_and_defaults():
  raw = {"model_type": "clip", "projection_dim": 768,
         "text_config": {"hidden_size": 512}, "text_config_dict": {"hidden_size": 768, "eos_token_id": 2},
         "vision_config_dict": {"hidden_size": 1024, "patch_size": [14, 14], "num_attention_heads": 16}}
  cfg = clip.CLIPConfig.from_hf(raw)
  hf = transformers.CLIPConfig(**raw)
  assert cfg.text.hidden_size == hf.text_config.hidden_size == 768
  assert cfg.vision.hidden_size == hf.vision_config.hidden_size == 1024
  assert cfg.vision.patch_size == 14 and cfg.text.eos_token_id == 2
  assert cfg.text.vocab_size == hf.text_config.vocab_size and cfg.vision.image_size == hf.vision_config.image_size
  with pytest.raises(ValueError, match="hidden_act 'swish'"):
    clip.CLIPConfig.from_hf({"text_config": {"hidden_act": "swish"}}, source="x/config.json")


@pytest.mark.parametrize("name,text,vision,layers,patch,image,embed", [
    ("vit-b-32", 512, 768, 12, 32, 224, 512), ("vit-b-16", 512, 768, 12, 16, 224, 512),
    ("vit-l-14", 768, 1024, 24, 14, 224, 768), ("vit-l-14-336", 768, 1024, 24, 14, 336, 768)])
def test_presets(name, text, vision, layers, patch, image, embed):
  cfg = clip.preset(name)
  assert (cfg.text.hidden_size, cfg.vision.hidden_size, cfg.vision.num_hidden_layers, cfg.vision.patch_size,
          cfg.vision.image_size, cfg.projection_dim) == (text, vision, layers, patch, image, embed)
  assert cfg.text.num_hidden_layers == 12 and cfg.text.hidden_size // cfg.text.num_attention_heads == 64
  assert cfg.vision.hidden_size // cfg.vision.num_attention_heads == 64
  assert name in config_lib.HUB_IDS and cfg.vision.num_patches == (image // patch) ** 2
  if name == "vit-b-16":  # the default backbone; tracing a full-size tower takes seconds, so once is enough
    shapes = init_lib.param_shapes(cfg)
    assert shapes["vision_model"]["embeddings"]["position_embedding"]["embedding"].shape == (197, 768)
    assert shapes["vision_model"]["embeddings"]["patch_embedding"]["kernel"].shape == (16, 16, 3, 768)
    assert shapes["visual_projection"]["kernel"].shape == (768, 512)
    assert len(shapes["vision_model"]["encoder"]["layers"]) == 12


def test_fingerprint_is_stable_and_sensitive(tiny):
  _, _, bundle = tiny
  fp = checkpoint.fingerprint(bundle.params)
  assert fp == bundle.fingerprint and len(fp) == 16
  changed = jax.tree.map(lambda x: x, bundle.params)
  changed["logit_scale"] = bundle.params["logit_scale"] + 1e-6
  assert checkpoint.fingerprint(changed) != fp


def _rel(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def test_bfloat16_against_transformers_in_bfloat16(tiny):
  """Our bf16 towers (f32-accumulating matmuls, f32 LayerNorm) against transformers' CLIPModel in bf16, both
  measured against the float32 truth: ours within BF16_TOLERANCE of it, and no less accurate than torch's bf16."""
  hf_model, folder, bundle = tiny
  pixels, ids = _inputs(seed=6, eos=500)
  truth = _torch_outputs(hf_model, pixels, ids)
  hf_bf16 = copy.deepcopy(hf_model).to(torch.bfloat16)
  input_ids = torch.from_numpy(ids.astype(np.int64))
  pixel_values = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(torch.bfloat16)
  with torch.no_grad():
    theirs = {"image": hf_bf16.get_image_features(pixel_values=pixel_values).pooler_output.float().numpy(),
              "text": hf_bf16.get_text_features(input_ids=input_ids).pooler_output.float().numpy()}
  for param_dtype in ("float32", "bfloat16"):
    low = clip.load(folder, dtype="bfloat16", param_dtype=param_dtype)
    assert low.fingerprint == bundle.fingerprint  # the file's float32 values, whatever the storage
    assert all(x.dtype == jnp.dtype(param_dtype) for x in jax.tree.leaves(low.params))
    ours = _forward(low.model, low.params, pixels, ids)
    for key in ("image", "text"):
      ours_err, torch_err = _rel(ours[key], truth[key]), _rel(theirs[key], truth[key])
      assert ours_err < BF16_TOLERANCE, (param_dtype, key, ours_err)
      assert ours_err <= 1.5 * torch_err + 1e-3, (param_dtype, key, ours_err, torch_err)
      assert _rel(ours[key], theirs[key]) < 2 * BF16_TOLERANCE, (param_dtype, key)


def test_bfloat16_matmuls_accumulate_in_float32():
  """A long contraction of bf16 inputs: accumulated in f32 and rounded once it is exact to bf16 precision;
  summed in bf16 it would not be (this is what `f32_accumulating` buys)."""
  x = jnp.full((1, 4096), 1.0 + 2 ** -7, jnp.bfloat16)  # exactly representable in bf16
  w = jnp.ones((4096, 1), jnp.bfloat16)
  exact = 4096 * (1.0 + 2 ** -7)
  acc = layers_lib.f32_accumulating(jnp.bfloat16)(x, w, (((1,), (0,)), ((), ())))
  assert acc.dtype == jnp.bfloat16 and float(acc[0, 0]) == float(jnp.bfloat16(exact))
  assert layers_lib.f32_accumulating(jnp.float32) is None
