"""The MCPF-specific math against an independent plain-numpy reference.

The reference functions below (the `_np_*` ones) use numpy and math only: no jax, flax or mcpf_jax code. They are
written from the equations of the module docstrings (mcpf_jax/model/fusion.py, mcpf_jax/model/iqa.py,
mcpf_jax/clip/layers.py, mcpf_jax/clip/model.py) and flax's documented layer semantics, and read the modules' own
randomly initialised (then perturbed) parameters out of the flax tree as numpy arrays. They compute in float64; the
modules in float32.

The tiny CLIP has towers of different widths (text 32, vision 48) and the prompt sets different lengths (text 4,
vision 3), so a text/vision mix-up cannot go unnoticed by shapes that happen to agree. Every parameter leaf is
perturbed (biases, LayerNorm scales and biases, prompts), so no term of an equation is hidden behind a zero or a
one. The text prompts reach only 2 of the 3 layers while the visual prompts reach all 3, so the pass-through of
the deeper, unfused visual prompts is exercised too.

Tolerances: rtol = atol = 1e-5 throughout (float32 module vs float64 reference, 3-layer towers). Measured: the
fusion math agrees to ~5e-7; block inputs and features to ~2e-6; the logits, which exp(logit_scale) = 30 scales
up, to 7.5e-6 absolute at 3e-6 relative (under the 1e-5 + 1e-5 |x| bound), so 1e-6 would be too tight.
"""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mcpf_jax import model as iqa
from mcpf_jax.clip.config import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from mcpf_jax.clip.layers import EncoderLayer
from mcpf_jax.clip.tiny import perturbed_params
from mcpf_jax.clip.tokenizer import Tokenizer
from mcpf_jax.model.fusion import CrossAttentionFusion, PromptFusion

RTOL = ATOL = 1e-5
LAYERS = 3
IMAGE, PATCH = 32, 8
TEXT_WIDTH, VISION_WIDTH, HEADS, EMBED = 32, 48, 4, 24
N_TEXT, N_VISION = 4, 3
LOGIT_SCALE = 30.0
MODEL = dict(prompt_depth=2, vision_depth=LAYERS, num_text_prompts=N_TEXT, num_vision_prompts=N_VISION,
             text_prompt_init="a photo of a", fusion_width=16, fusion_heads=2, query_heads=2,
             aux=("scene", "distortion"))
VARIANTS = {
    "mcpf": dict(name="mcpf"),
    # MaPLe makes its visual prompts from the text ones: as many of each, and only where text prompts are.
    "maple": dict(name="maple", num_vision_prompts=N_TEXT, vision_depth=None),
    "mpiqe": dict(name="mpiqe", prompt_depth=None, vision_depth=None),
}


# ----------------------------------------------------------------------------------------------------------------
# The plain-numpy reference (numpy + math only).
# ----------------------------------------------------------------------------------------------------------------


def _np_layer_norm(x, p, eps):
  """LayerNorm over the last axis: (x - mean) / sqrt(var + eps) * scale + bias (biased variance)."""
  mean = x.mean(axis=-1, keepdims=True)
  var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_dense(x, p):
  """x @ kernel (+ bias)."""
  y = x @ p["kernel"]
  return y + p["bias"] if "bias" in p else y


def _np_softmax(x, axis=-1):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def _np_mha(p, queries, keys_values):
  """flax nn.MultiHeadDotProductAttention(inputs_q=queries, inputs_k=keys_values), values = keys.

  q/k/v: DenseGeneral kernels [in, heads, head_dim] with biases [heads, head_dim]; per head
  softmax(q k^T / sqrt(head_dim)) v; out: DenseGeneral kernel [heads, head_dim, out] + bias [out].
  queries [..., n_q, d_q], keys_values [..., n_k, d_k] -> [..., n_q, out].
  """
  q = np.einsum("...nd,dhk->...nhk", queries, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("...nd,dhk->...nhk", keys_values, p["key"]["kernel"]) + p["key"]["bias"]
  v = np.einsum("...nd,dhk->...nhk", keys_values, p["value"]["kernel"]) + p["value"]["bias"]
  head_dim = q.shape[-1]
  logits = np.einsum("...qhk,...thk->...hqt", q, k) / math.sqrt(head_dim)
  probs = _np_softmax(logits, axis=-1)
  gathered = np.einsum("...hqt,...thk->...qhk", probs, v)
  return np.einsum("...qhk,hko->...qo", gathered, p["out"]["kernel"]) + p["out"]["bias"]


def _np_cross_attention_fusion(p, text, vision):
  """MCPF fusion of one layer (fusion.py docstring).

  t = W_t text, v = W_v vision (shared width); t' = LN_t(t + MHA(t <- v)), v' = LN_v(v + MHA(v <- t));
  text_out = text + U_t t', vision_out = vision + U_v v'.
  """
  t = _np_dense(text, p["text_in"])
  v = _np_dense(vision, p["vision_in"])
  t_fused = _np_layer_norm(t + _np_mha(p["text_from_vision"], t, v), p["text_norm"], 1e-6)
  v_fused = _np_layer_norm(v + _np_mha(p["vision_from_text"], v, t), p["vision_norm"], 1e-6)
  return text + _np_dense(t_fused, p["text_out"]), vision + _np_dense(v_fused, p["vision_out"])


def _np_prompt_fusion(p, kind, depth, text, vision):
  """Per layer j < depth: "cross_attention" fuses (T_j, V_j) with layer j's own parameters; "linear": V_j =
  Linear_j(T_j). Layers from `depth` on keep their prompts."""
  text = list(text)
  if kind == "linear":
    return text, [_np_dense(text[j], p[f"linear_{j}"]) for j in range(depth)]
  vision = list(vision)
  for j in range(depth):
    text[j], vision[j] = _np_cross_attention_fusion(p[f"layer_{j}"], text[j], vision[j])
  return text, vision


def _np_quick_gelu(x):
  return x / (1.0 + np.exp(-1.702 * x))


def _np_clip_block(p, x, heads, causal, eps):
  """Pre-LayerNorm CLIP block: x + SelfAttn(LN1 x), then + MLP(LN2 x) (quick_gelu), scale head_dim ** -0.5."""
  batch, tokens, width = x.shape
  head_dim = width // heads
  h = _np_layer_norm(x, p["layer_norm1"], eps)
  split = lambda a: a.reshape(batch, tokens, heads, head_dim)
  q, k, v = (split(_np_dense(h, p["self_attn"][f"{n}_proj"])) for n in "qkv")
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) * head_dim ** -0.5
  if causal:
    logits = np.where(np.tril(np.ones((tokens, tokens), bool)), logits, -np.inf)
  out = np.einsum("bhqk,bkhd->bqhd", _np_softmax(logits, axis=-1), v).reshape(batch, tokens, width)
  x = x + _np_dense(out, p["self_attn"]["out_proj"])
  h = _np_layer_norm(x, p["layer_norm2"], eps)
  return x + _np_dense(_np_quick_gelu(_np_dense(h, p["mlp"]["fc1"])), p["mlp"]["fc2"])


def _per_row(prompt, batch):
  """[n, w] (shared) or [batch, n, w] -> [batch, n, w]."""
  return np.broadcast_to(prompt, (batch,) + prompt.shape) if prompt.ndim == 2 else prompt


def _np_text_tower(p, ids, prompts, heads, eps, eos_id):
  """CLIP text tower with prompts (clip/model.py docstring).

  prompts[0] replaces the token embeddings at positions 1..n (before the position embedding); prompts[j], j >= 1,
  replaces hidden positions 1..n at the input of block j. Pooled at the first end-of-text id, after the final
  LayerNorm, then projected. Returns (features [rows, E], the input of every block).
  """
  rows, tokens = ids.shape
  emb = p["text_model"]["embeddings"]
  x = emb["token_embedding"]["embedding"][ids]
  if prompts:
    x[:, 1:1 + prompts[0].shape[-2]] = _per_row(prompts[0], rows)
  x = x + emb["position_embedding"]["embedding"][:tokens][None]
  inputs = []
  for i in range(len(p["text_model"]["encoder"]["layers"])):
    if 1 <= i < len(prompts):
      x = x.copy()
      x[:, 1:1 + prompts[i].shape[-2]] = _per_row(prompts[i], rows)
    inputs.append(x)
    x = _np_clip_block(p["text_model"]["encoder"]["layers"][str(i)], x, heads, True, eps)
  x = _np_layer_norm(x, p["text_model"]["final_layer_norm"], eps)
  pooled = x[np.arange(rows), np.argmax(ids == eos_id, axis=-1)]
  return pooled @ p["text_projection"]["kernel"], inputs


def _np_vision_tower(p, pixels, prompts, heads, eps, patch):
  """CLIP vision tower with prompts (clip/model.py docstring).

  Patches (row-major) after CLS, + position embedding; prompts[0] appended after the patches, then pre_layrnorm;
  prompts[j], j >= 1, replaces the last n tokens at the input of block j. Returns (features [B, E] = projected
  post_layernorm(CLS), tokens = last block's output [B, 1 + patches + n, width], the input of every block).
  """
  vm = p["vision_model"]
  batch, height, width_px, channels = pixels.shape
  gh, gw = height // patch, width_px // patch
  kernel = vm["embeddings"]["patch_embedding"]["kernel"]  # HWIO
  grid = pixels.reshape(batch, gh, patch, gw, patch, channels).transpose(0, 1, 3, 2, 4, 5)
  patches = grid.reshape(batch, gh * gw, -1) @ kernel.reshape(-1, kernel.shape[-1])
  cls = np.broadcast_to(vm["embeddings"]["class_embedding"], (batch, 1, kernel.shape[-1]))
  x = np.concatenate([cls, patches], axis=1) + vm["embeddings"]["position_embedding"]["embedding"][None]
  if prompts:
    x = np.concatenate([x, _per_row(prompts[0], batch)], axis=1)
  x = _np_layer_norm(x, vm["pre_layrnorm"], eps)
  inputs = []
  for i in range(len(vm["encoder"]["layers"])):
    if 1 <= i < len(prompts):
      n = prompts[i].shape[-2]
      x = np.concatenate([x[:, :-n], _per_row(prompts[i], batch)], axis=1)
    inputs.append(x)
    x = _np_clip_block(vm["encoder"]["layers"][str(i)], x, heads, False, eps)
  pooled = _np_layer_norm(x[:, 0], vm["post_layernorm"], eps)
  return pooled @ p["visual_projection"]["kernel"], x, inputs


def _np_normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_quality(logits):
  """p = softmax(logits); score = sum_k p_k (k + 1) (expected level on [1, L]); score01 = (score - 1) / (L - 1)."""
  levels = logits.shape[-1]
  score = _np_softmax(logits, axis=-1) @ np.arange(1, levels + 1)
  return score, (score - 1.0) / (levels - 1)


def _np_text_query_head(p, queries, tokens, image):
  """MP-IQE head (iqa.py TextQueryHead): the class text features [Q, E] query the projected, LayerNormed image
  tokens [B, T, E] by cross-attention; evidence = LN(attended) [B, Q, E]; quality feature = image + W mean_Q."""
  # (the head count is in the shapes of the attention kernels)
  attended = _np_mha(p["attention"], np.broadcast_to(queries, (tokens.shape[0],) + queries.shape), tokens)
  evidence = _np_layer_norm(attended, p["norm"], 1e-6)
  return evidence, image + _np_dense(evidence.mean(axis=1), p["to_quality"])


def _np_iqa(params, setup, pixels):
  """The whole IQAModel forward (iqa.py): prompts -> fusion -> towers -> head -> logits and score.

  `setup`: plain values (ints, strings, numpy ids) describing the variant; returns (outputs, block inputs).
  """
  s = setup
  clip = params["clip"]
  # Prompts of every layer: one shared text set ("all") or one per class set; visual ones unless MaPLe makes them.
  text = {g[len("text_prompts_"):]: list(v) for g, v in params.items() if g.startswith("text_prompts_")}
  vision = list(params["vision_prompts"]) if "vision_prompts" in params else None
  if s["fusion"] != "none":
    text["all"], vision = _np_prompt_fusion(params["fusion"], s["fusion"], s["fusion_depth"], text["all"], vision)
  # Class text features: each row of a class set with its own set's prompts (or the shared ones).
  features, text_inputs = {}, {}
  for name, ids in s["ids"].items():
    prompts = text.get("all", text.get(name))
    feats, text_inputs[name] = _np_text_tower(clip, ids, prompts, s["text_heads"], s["eps"], s["eos"])
    features[name] = _np_normalize(feats)
  scale = math.exp(float(clip["logit_scale"]))
  image, tokens, vision_inputs = _np_vision_tower(clip, pixels, vision, s["vision_heads"], s["eps"], s["patch"])
  out = {}
  if s["head"] == "text_query":
    tokens = _np_layer_norm(tokens, params["token_norm"], 1e-6) @ clip["visual_projection"]["kernel"]
    queries = np.concatenate([features[a] for a in s["aux"]], axis=0)
    evidence, quality = _np_text_query_head(params["query_head"], queries, tokens, image)
    evidence, start = _np_normalize(evidence), 0
    for a in s["aux"]:  # each class query's logit: the cosine between its evidence and its own text feature
      k = features[a].shape[0]
      out[f"{a}_logits"] = scale * np.sum(evidence[:, start:start + k] * features[a][None], axis=-1)
      start += k
    image = _np_normalize(quality)
  else:
    image = _np_normalize(image)
    for a in s["aux"]:
      out[f"{a}_logits"] = scale * image @ features[a].T
  out["quality_logits"] = scale * image @ features["quality"].T
  out["score"], out["score01"] = _np_quality(out["quality_logits"])
  return out, text_inputs, vision_inputs, (text, vision)


# ----------------------------------------------------------------------------------------------------------------
# Fixtures: the modules and their parameters.
# ----------------------------------------------------------------------------------------------------------------


def _as_numpy(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _perturbed(tree, seed, scale=0.3):
  """Every leaf + N(0, scale^2): zero biases and unit LayerNorm scales would hide terms of the equations."""
  leaves, treedef = jax.tree.flatten(tree)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [jnp.asarray(np.asarray(x) + scale * rng.standard_normal(np.shape(x)),
                                                  jnp.float32) for x in leaves])


def _clip_config():
  text = CLIPTextConfig(hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=LAYERS,
                        num_attention_heads=HEADS)
  vision = CLIPVisionConfig(hidden_size=VISION_WIDTH, intermediate_size=4 * VISION_WIDTH, num_hidden_layers=LAYERS,
                            num_attention_heads=HEADS, image_size=IMAGE, patch_size=PATCH)
  return CLIPConfig(text=text, vision=vision, projection_dim=EMBED)


@pytest.fixture(scope="module")
def bundle():
  config = _clip_config()
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32),
                        perturbed_params(config, seed=5, logit_scale=LOGIT_SCALE))
  return types.SimpleNamespace(config=config, params=params, tokenizer=Tokenizer.default())


@pytest.fixture(scope="module")
def pixels():
  return np.random.default_rng(7).normal(size=(2, IMAGE, IMAGE, 3)).astype(np.float32)


def _build(bundle, variant):
  model, params = iqa.build({**MODEL, **VARIANTS[variant]}, bundle, jax.random.key(1))
  new = _perturbed({k: v for k, v in params.items() if k != "clip"}, seed=11)
  return model, {**new, "clip": params["clip"]}


def _setup(model):
  s, c = model.spec, model.clip_config
  return dict(fusion=s.fusion, fusion_depth=min(s.text_depth, s.vision_depth), head=s.head, aux=s.aux,
              text_heads=c.text.num_attention_heads,
              vision_heads=c.vision.num_attention_heads, eps=c.text.layer_norm_eps, eos=c.text.eos_token_id,
              patch=c.vision.patch_size, ids={name: np.asarray(rows) for name, rows in model.text_ids})


def _block_inputs(model, params, pixels):
  """Runs the model, recording the input of every CLIP block: {("text" | "vision", layer): [batch, tokens, w]}."""
  seen = {}

  def record(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, EncoderLayer) and context.method_name == "__call__":
      path = module.scope.path
      tower = "text" if "text_model" in path else "vision"
      seen[(tower, int(path[-1]))] = np.asarray(args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    out = model.apply({"params": params}, pixels)
  return out, seen


# ----------------------------------------------------------------------------------------------------------------
# Tests.
# ----------------------------------------------------------------------------------------------------------------


def test_cross_attention_fusion_matches_numpy():
  """One MCPF fusion layer: projections, both attention directions, residual + LayerNorm, back-projections."""
  rng = np.random.default_rng(0)
  text = rng.normal(size=(5, 12)).astype(np.float32)   # n = 5 prompts of width Dt = 12
  vision = rng.normal(size=(3, 20)).astype(np.float32)  # n_v = 3 prompts of width Dv = 20
  fusion = CrossAttentionFusion(width=8, num_heads=2)
  params = _perturbed(fusion.init(jax.random.key(0), text, vision)["params"], seed=1)
  got_text, got_vision = fusion.apply({"params": params}, text, vision)
  want_text, want_vision = _np_cross_attention_fusion(_as_numpy(params), text.astype(np.float64),
                                                      vision.astype(np.float64))
  assert got_text.shape == text.shape and got_vision.shape == vision.shape
  np.testing.assert_allclose(got_text, want_text, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(got_vision, want_vision, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", ["cross_attention", "linear"])
def test_prompt_fusion_over_layers_matches_numpy(kind):
  """PromptFusion over 3 fused layers of 4: layer j fuses (T_j, V_j) with its own parameters layer_j (linear_j);
  layer 3 passes through."""
  rng = np.random.default_rng(2)
  layers, depth = 4, 3
  n_vision = 5 if kind == "cross_attention" else 4  # "linear" makes as many visual prompts as text ones
  text = [rng.normal(size=(4, 12)).astype(np.float32) for _ in range(layers)]
  vision = [rng.normal(size=(n_vision, 20)).astype(np.float32) for _ in range(layers)]
  fusion = PromptFusion(kind=kind, depth=depth, width=8, num_heads=2, vision_width=20)
  vision_in = vision if kind == "cross_attention" else None
  params = _perturbed(fusion.init(jax.random.key(0), text, vision_in)["params"], seed=3)
  got_text, got_vision = fusion.apply({"params": params}, text, vision_in)
  want_text, want_vision = _np_prompt_fusion(_as_numpy(params), kind, depth, _as_numpy(text), _as_numpy(vision))
  assert len(got_text) == layers and len(got_vision) == (layers if kind == "cross_attention" else depth)
  for j, (got, want) in enumerate(zip(got_text + got_vision, want_text + want_vision)):
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=f"prompt {j}")
  if kind == "cross_attention":  # the passed-through layer is the very same array
    np.testing.assert_array_equal(got_text[depth], text[depth])
    np.testing.assert_array_equal(got_vision[depth], vision[depth])


@pytest.mark.parametrize("variant", ["mcpf", "maple"])
def test_prompts_reach_their_layers(bundle, pixels, variant):
  """Routing: the input of block j of each tower carries the numpy-fused prompts of layer j (text prompt j fused
  with visual prompt j), at positions 1..n (text) / the last n_v (vision); unfused visual prompts past the text
  depth; and every block input, not only the prompt slots, equals the numpy towers' (text: up to the span the
  model computes)."""
  model, params = _build(bundle, variant)
  out, seen = _block_inputs(model, params, pixels)
  want, text_inputs, vision_inputs, (text, vision) = _np_iqa(_as_numpy(params), _setup(model),
                                                             pixels.astype(np.float64))
  s = model.spec
  assert sorted(seen) == [(t, i) for t in ("text", "vision") for i in range(LAYERS)]
  rows = np.concatenate([text_inputs[name][0] for name, _ in model.text_ids]).shape[0]
  for j in range(1, LAYERS):
    got_text, got_vision = seen[("text", j)], seen[("vision", j)]
    assert got_text.shape[0] == rows and got_vision.shape[0] == len(pixels)
    if j < s.text_depth:
      np.testing.assert_allclose(got_text[:, 1:1 + s.num_text_prompts], np.broadcast_to(text["all"][j], (
          rows, s.num_text_prompts, TEXT_WIDTH)), rtol=RTOL, atol=ATOL, err_msg=f"text prompts of block {j}")
    if j < len(vision):
      np.testing.assert_allclose(got_vision[:, -s.num_vision_prompts:], np.broadcast_to(vision[j], (
          len(pixels), s.num_vision_prompts, VISION_WIDTH)), rtol=RTOL, atol=ATOL,
          err_msg=f"visual prompts of block {j}")
  if variant == "mcpf":  # the third visual prompt set is past the text depth: the raw parameter
    assert s.text_depth == 2 and s.vision_depth == LAYERS
    np.testing.assert_allclose(seen[("vision", 2)][:, -N_VISION:],
                               np.broadcast_to(np.asarray(params["vision_prompts"][2]), (len(pixels), N_VISION,
                                                                                        VISION_WIDTH)),
                               rtol=0, atol=0)
  for j in range(LAYERS):
    want_text = np.concatenate([text_inputs[name][j] for name, _ in model.text_ids])
    got_text = seen[("text", j)]
    np.testing.assert_allclose(got_text, want_text[:, :got_text.shape[1]], rtol=RTOL, atol=ATOL,
                               err_msg=f"text block {j} input")
    np.testing.assert_allclose(seen[("vision", j)], vision_inputs[j], rtol=RTOL, atol=ATOL,
                               err_msg=f"vision block {j} input")
  for key in want:
    np.testing.assert_allclose(out[key], want[key], rtol=RTOL, atol=ATOL, err_msg=key)


@pytest.mark.parametrize("variant", ["mcpf", "maple", "mpiqe"])
def test_iqa_forward_matches_numpy(bundle, pixels, variant):
  """The whole forward (prompts, fusion, prompted towers, head, score) against the numpy forward."""
  model, params = _build(bundle, variant)
  out = model.apply({"params": params}, pixels)
  want = _np_iqa(_as_numpy(params), _setup(model), pixels.astype(np.float64))[0]
  expected = {"quality_logits", "score", "score01", "scene_logits", "distortion_logits"}
  assert set(out) == expected and set(want) == expected
  for key in sorted(expected):
    np.testing.assert_allclose(out[key], want[key], rtol=RTOL, atol=ATOL, err_msg=key)


def test_text_query_head_matches_numpy(bundle, pixels):
  """MP-IQE: from the model's own class features and image tokens, the numpy head gives its logits and score.

  Isolates the head from the towers: the class features and vision tokens are taken from the module, the rest
  (token LayerNorm, projection, cross-attention of the text queries over the tokens, evidence LayerNorm, the
  per-class cosine logits, the quality feature and the expected level) is numpy.
  """
  model, params = _build(bundle, "mpiqe")
  assert model.spec.head == "text_query" and model.spec.fusion == "none" and model.spec.vision_depth == LAYERS

  def towers(m, px):
    text_prompts, vision_prompts = m.prompts()
    image, tokens = m.clip.encode_image(px, vision_prompts, return_tokens=True)
    return m.encode_classes(text_prompts), image, tokens

  class_features, image, tokens = _as_numpy(model.apply({"params": params}, pixels, method=towers))
  out = model.apply({"params": params}, pixels)
  p = _as_numpy(params)
  scale = math.exp(float(p["clip"]["logit_scale"]))
  tokens = _np_layer_norm(tokens, p["token_norm"], 1e-6) @ p["clip"]["visual_projection"]["kernel"]
  queries = np.concatenate([class_features["scene"], class_features["distortion"]])
  evidence, quality = _np_text_query_head(p["query_head"], queries, tokens, image)
  evidence = _np_normalize(evidence)
  n_scene = class_features["scene"].shape[0]
  np.testing.assert_allclose(out["scene_logits"], scale * np.sum(evidence[:, :n_scene] * class_features["scene"],
                                                                 axis=-1), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(out["distortion_logits"], scale * np.sum(
      evidence[:, n_scene:] * class_features["distortion"], axis=-1), rtol=RTOL, atol=ATOL)
  logits = scale * _np_normalize(quality) @ class_features["quality"].T
  score, score01 = _np_quality(logits)
  np.testing.assert_allclose(out["quality_logits"], logits, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(out["score"], score, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(out["score01"], score01, rtol=RTOL, atol=ATOL)


def test_cosine_head_and_score_match_numpy(bundle, pixels):
  """MCPF's head: p = softmax(logit_scale cos(image, text_k)), score = sum_k p_k (k + 1), score01 = (score - 1) /
  (L - 1), from the model's own image and class features."""
  model, params = _build(bundle, "mcpf")

  def features(m, px):
    text_prompts, vision_prompts = m.prompts()
    return m.encode_classes(text_prompts), m.clip.encode_image(px, vision_prompts)

  class_features, image = _as_numpy(model.apply({"params": params}, pixels, method=features))
  out = model.apply({"params": params}, pixels)
  scale = math.exp(float(np.asarray(params["clip"]["logit_scale"])))
  cos = lambda a, b: (a @ b.T) / np.linalg.norm(a, axis=-1, keepdims=True) / np.linalg.norm(b, axis=-1)[None]
  logits = scale * cos(image, class_features["quality"])
  levels = logits.shape[-1]
  assert levels == 5
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  score = np.sum(probs * np.arange(1, levels + 1), axis=-1)
  np.testing.assert_allclose(out["quality_logits"], logits, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(out["score"], score, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(out["score01"], (score - 1) / (levels - 1), rtol=RTOL, atol=ATOL)
  assert np.all((out["score"] >= 1) & (out["score"] <= levels))
  for a in ("scene", "distortion"):
    np.testing.assert_allclose(out[f"{a}_logits"], scale * cos(image, class_features[a]), rtol=RTOL, atol=ATOL)
