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

The same forward runs on a tiny SigLIP tower too (mcpf_jax/clip/siglip.py, mcpf_jax/model/iqa.py's SigLIP notes): no
class token and no pre-LayerNorm, bidirectional text attention pooled at the last position through the text head,
text prompts at positions 0..n-1, the MAP head's probe pooling the patch tokens (visual prompts dropped before it),
SigLIP's pixel normalisation derived from CLIP's, the learned logit bias on every class logit, and the sigmoid reading
of the quality logits (model.class_probs="sigmoid").
"""

import functools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from siglip_support import write_gemma_tokenizer

from mcpf_jax import model as iqa
from mcpf_jax.clip.config import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from mcpf_jax.clip.layers import EncoderLayer
from mcpf_jax.clip.siglip import SiglipConfig, SiglipTextConfig, SiglipVisionConfig
from mcpf_jax.clip.siglip import param_shapes as siglip_param_shapes
from mcpf_jax.clip.siglip_tokenizer import SiglipTokenizer
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


def _np_gelu_tanh(x):
  """GELU, tanh approximation (SigLIP's gelu_pytorch_tanh): 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))."""
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _np_vision_blocks(layers, x, prompts, batch, heads, eps, *gelu):
  """The vision blocks with deep prompts: block i >= 1 replaces the last n tokens by prompts[i] (if given).

  Returns the last block's output and each block's input.
  """
  inputs = []
  for i in range(len(layers)):
    if 1 <= i < len(prompts):
      n = prompts[i].shape[-2]
      x = np.concatenate([x[:, :-n], _per_row(prompts[i], batch)], axis=1)
    inputs.append(x)
    x = _np_clip_block(layers[str(i)], x, heads, False, eps, *gelu)
  return x, inputs


def _np_clip_block(p, x, heads, causal, eps, act=_np_quick_gelu):
  """Pre-LayerNorm CLIP block: x + SelfAttn(LN1 x), then + MLP(LN2 x) (`act`: CLIP's quick_gelu, SigLIP's tanh
  GELU), scale head_dim ** -0.5."""
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
  return x + _np_dense(act(_np_dense(h, p["mlp"]["fc1"])), p["mlp"]["fc2"])


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
  x, inputs = _np_vision_blocks(vm["encoder"]["layers"], x, prompts, batch, heads, eps)
  pooled = _np_layer_norm(x[:, 0], vm["post_layernorm"], eps)
  return pooled @ p["visual_projection"]["kernel"], x, inputs


def _np_siglip_text_tower(p, ids, prompts, heads, eps):
  """SigLIP text tower with prompts (siglip.py TextTransformer): no start token, so prompts[0] replaces the token
  embeddings at positions 0..n-1 (before the position embedding) and prompts[j], j >= 1, hidden positions 0..n-1 at
  the input of block j; no causal mask; the last position's state after the final LayerNorm, through the head
  (a Dense with bias). Returns (features [rows, E], the input of every block)."""
  rows, tokens = ids.shape
  tm = p["text_model"]
  x = tm["embeddings"]["token_embedding"]["embedding"][ids]
  if prompts:
    x[:, :prompts[0].shape[-2]] = _per_row(prompts[0], rows)
  x = x + tm["embeddings"]["position_embedding"]["embedding"][:tokens][None]
  inputs = []
  for i in range(len(tm["encoder"]["layers"])):
    if 1 <= i < len(prompts):
      x = x.copy()
      x[:, :prompts[i].shape[-2]] = _per_row(prompts[i], rows)
    inputs.append(x)
    x = _np_clip_block(tm["encoder"]["layers"][str(i)], x, heads, False, eps, _np_gelu_tanh)
  x = _np_layer_norm(x, tm["final_layer_norm"], eps)
  return _np_dense(x[:, -1], tm["head"]), inputs


def _np_map_head(p, x, heads, eps):
  """SigLIP's MAP head: a learned probe [1, 1, w] queries the tokens through torch-layout multi-head attention
  (in_proj_weight [3w, w] = W_q; W_k; W_v applied as x W^T + b, out_proj a Dense), h = that attention's output,
  h + MLP(LN h) (tanh GELU), the probe's row. x [B, T, w] -> [B, w]."""
  batch, _, width = x.shape
  head_dim = width // heads
  w, b = p["attention"]["in_proj_weight"], p["attention"]["in_proj_bias"]
  probe = np.broadcast_to(p["probe"], (batch, 1, width))
  q, k, v = (inp @ w[j * width:(j + 1) * width].T + b[j * width:(j + 1) * width]
             for j, inp in enumerate((probe, x, x)))
  q, k, v = (a.reshape(batch, a.shape[1], heads, head_dim) for a in (q, k, v))
  probs = _np_softmax(np.einsum("bqhd,bkhd->bhqk", q, k) * head_dim ** -0.5, axis=-1)
  h = _np_dense(np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, 1, width), p["attention"]["out_proj"])
  mlp = p["mlp"]
  h = h + _np_dense(_np_gelu_tanh(_np_dense(_np_layer_norm(h, p["layernorm"], eps), mlp["fc1"])), mlp["fc2"])
  return h[:, 0]


def _np_siglip_vision_tower(p, pixels, prompts, heads, eps, patch):
  """SigLIP vision tower with prompts (siglip.py VisionTransformer): patch embedding with a bias (row-major), no
  class token, + position embedding; prompts[0] appended after the patches (no pre-LayerNorm), prompts[j], j >= 1,
  replaces the last n tokens at the input of block j; post-LayerNorm; the MAP head pools the patch tokens only.
  Returns (features [B, w], tokens = post-LayerNorm states [B, patches + n, w], the input of every block)."""
  vm = p["vision_model"]
  batch, height, width_px, channels = pixels.shape
  gh, gw = height // patch, width_px // patch
  kernel = vm["embeddings"]["patch_embedding"]["kernel"]  # HWIO
  grid = pixels.reshape(batch, gh, patch, gw, patch, channels).transpose(0, 1, 3, 2, 4, 5)
  x = grid.reshape(batch, gh * gw, -1) @ kernel.reshape(-1, kernel.shape[-1]) + vm["embeddings"]["patch_embedding"][
      "bias"]
  x = x + vm["embeddings"]["position_embedding"]["embedding"][None]
  if prompts:
    x = np.concatenate([x, _per_row(prompts[0], batch)], axis=1)
  x, inputs = _np_vision_blocks(vm["encoder"]["layers"], x, prompts, batch, heads, eps, _np_gelu_tanh)
  x = _np_layer_norm(x, vm["post_layernorm"], eps)
  return _np_map_head(vm["head"], x[:, :gh * gw], heads, eps), x, inputs


def _np_siglip_pixels(pixels):
  """The model takes CLIP-normalised pixels; SigLIP's are (x - 0.5) / 0.5 of the same [0, 1] image."""
  clip_mean = np.array([0.48145466, 0.4578275, 0.40821073])
  clip_std = np.array([0.26862954, 0.26130258, 0.27577711])
  return (pixels * clip_std + clip_mean - 0.5) / 0.5


def _np_normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_quality(logits, class_probs="softmax"):
  """p = softmax(logits) (or, "sigmoid", sigmoid(logits) / sum sigmoid(logits)); score = sum_k p_k (k + 1) (expected
  level on [1, L]); score01 = (score - 1) / (L - 1)."""
  levels = logits.shape[-1]
  if class_probs == "sigmoid":
    match = 1.0 / (1.0 + np.exp(-logits))
    probs = match / match.sum(axis=-1, keepdims=True)
  else:
    probs = _np_softmax(logits, axis=-1)
  score = probs @ np.arange(1, levels + 1)
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

  `setup`: plain values (ints, strings, numpy ids) describing the variant; returns (outputs, block inputs). On a
  SigLIP backbone (setup["siglip"]): its towers and pixel normalisation, no visual projection (the states have the
  joint width), the logit bias added to every class logit, the score read by setup["class_probs"].
  """
  s = setup
  siglip = s.get("siglip", False)
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
    if siglip:
      feats, text_inputs[name] = _np_siglip_text_tower(clip, ids, prompts, s["text_heads"], s["eps"])
    else:
      feats, text_inputs[name] = _np_text_tower(clip, ids, prompts, s["text_heads"], s["eps"], s["eos"])
    features[name] = _np_normalize(feats)
  scale = math.exp(float(np.reshape(clip["logit_scale"], ())))
  if siglip:
    bias = float(clip["logit_bias"][0])
    image, tokens, vision_inputs = _np_siglip_vision_tower(clip, _np_siglip_pixels(pixels), vision,
                                                           s["vision_heads"], s["eps"], s["patch"])
  else:
    bias = 0.0
    image, tokens, vision_inputs = _np_vision_tower(clip, pixels, vision, s["vision_heads"], s["eps"], s["patch"])
  out = {}
  if s["head"] == "text_query":
    tokens = _np_layer_norm(tokens, params["token_norm"], 1e-6)
    tokens = tokens if siglip else tokens @ clip["visual_projection"]["kernel"]
    queries = np.concatenate([features[a] for a in s["aux"]], axis=0)
    evidence, quality = _np_text_query_head(params["query_head"], queries, tokens, image)
    evidence, start = _np_normalize(evidence), 0
    for a in s["aux"]:  # each class query's logit: the cosine between its evidence and its own text feature
      k = features[a].shape[0]
      out[f"{a}_logits"] = scale * np.sum(evidence[:, start:start + k] * features[a][None], axis=-1) + bias
      start += k
    image = _np_normalize(quality)
  else:
    image = _np_normalize(image)
    for a in s["aux"]:
      out[f"{a}_logits"] = scale * image @ features[a].T + bias
  out["quality_logits"] = scale * image @ features["quality"].T + bias
  out["score"], out["score01"] = _np_quality(out["quality_logits"], s.get("class_probs", "softmax"))
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


def _build(bundle, variant, **changes):
  model, params = iqa.build({**MODEL, **VARIANTS[variant], **changes}, bundle, jax.random.key(1))
  new = _perturbed({k: v for k, v in params.items() if k != "clip"}, seed=11)
  return model, {**new, "clip": params["clip"]}


def _setup(model):
  s, c = model.spec, model.clip_config
  return dict(fusion=s.fusion, fusion_depth=min(s.text_depth, s.vision_depth), head=s.head, aux=s.aux,
              text_heads=c.text.num_attention_heads,
              vision_heads=c.vision.num_attention_heads, eps=c.text.layer_norm_eps, eos=c.text.eos_token_id,
              patch=c.vision.patch_size, ids={name: np.asarray(rows) for name, rows in model.text_ids})


def _apply(model, params, pixels, method=None):
  """model.apply jitted at XLA's lowest optimisation level (one compile instead of one per op: seconds saved)."""
  fn = functools.partial(model.apply, method=method) if method is not None else model.apply
  return jax.device_get(jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})({"params": params},
                                                                                            pixels))


def _block_inputs(model, params, pixels):
  """Runs the model, recording the input of every CLIP block: {("text" | "vision", layer): [batch, tokens, w]}."""
  def run(params, pixels):  # jitted (one compile, not one per op): the recorded inputs are returned
    seen = {}

    def record(next_fun, args, kwargs, context):
      module = context.module
      if isinstance(module, EncoderLayer) and context.method_name == "__call__":
        path = module.scope.path
        tower = "text" if "text_model" in path else "vision"
        seen[(tower, int(path[-1]))] = args[0]
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
      out = model.apply({"params": params}, pixels)
    return out, seen

  out, seen = jax.jit(run, compiler_options={"xla_backend_optimization_level": 0})(params, pixels)
  return jax.device_get(out), {k: np.asarray(v) for k, v in seen.items()}


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
  out = _apply(model, params, pixels)
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

  class_features, image, tokens = _as_numpy(_apply(model, params, pixels, method=towers))
  out = _apply(model, params, pixels)
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

  class_features, image = _as_numpy(_apply(model, params, pixels, method=features))
  out = _apply(model, params, pixels)
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


# ----------------------------------------------------------------------------------------------------------------
# The same forward on a SigLIP backbone.
# ----------------------------------------------------------------------------------------------------------------

SIGLIP_BIAS = -2.5  # a real SigLIP's is large and negative (about -10 at initialisation); non-zero, to be missed


@pytest.fixture(scope="module")
def siglip_bundle(tmp_path_factory):
  """A tiny SigLIP (text 32 wide, vision 48, 3 layers each, 4x4 patches, 16 text positions) with random parameters
  (no leaf at zero or one: kernels N(0, 1 / fan_in), LayerNorm scales 1 + N(0, 0.3^2), every other leaf
  N(0, 0.3^2)), the logit scale at log 30 and the bias at -2.5, and a SigLIP 2-format tokenizer trained here
  (tests/siglip_support.py)."""
  config = SiglipConfig(
      text=SiglipTextConfig(vocab_size=400, hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH,
                            num_hidden_layers=LAYERS, num_attention_heads=HEADS, projection_size=VISION_WIDTH,
                            max_position_embeddings=16),
      vision=SiglipVisionConfig(hidden_size=VISION_WIDTH, intermediate_size=80, num_hidden_layers=LAYERS,
                                num_attention_heads=HEADS, image_size=IMAGE, patch_size=PATCH))
  rng = np.random.default_rng(13)

  def draw(path, shape):
    name = path[-1].key
    if name in ("kernel", "in_proj_weight"):
      fan_in = shape.shape[-1] if name == "in_proj_weight" else math.prod(shape.shape[:-1])
      return rng.normal(size=shape.shape) / math.sqrt(fan_in)
    return (name == "scale") + 0.3 * rng.normal(size=shape.shape)

  params = jax.tree_util.tree_map_with_path(lambda p, s: jnp.asarray(draw(p, s), jnp.float32),
                                            siglip_param_shapes(config))
  params = {**params, "logit_scale": jnp.full((1,), math.log(LOGIT_SCALE), jnp.float32),
            "logit_bias": jnp.full((1,), SIGLIP_BIAS, jnp.float32)}
  tokenizer = SiglipTokenizer.from_pretrained(write_gemma_tokenizer(tmp_path_factory.mktemp("gemma_tokenizer")),
                                              context_length=16)
  return types.SimpleNamespace(config=config, params=params, tokenizer=tokenizer, source="tiny SigLIP")


@pytest.mark.parametrize("variant, class_probs", [("mcpf", "softmax"), ("mpiqe", "sigmoid")])
def test_siglip_iqa_forward_matches_numpy(siglip_bundle, pixels, variant, class_probs):
  """MCPF (fusion, deep text and visual prompts) and MP-IQE (text-query head over unprojected SigLIP states, the
  sigmoid reading of the quality logits) on SigLIP against the numpy forward: the MAP head pools the patch tokens,
  the logit bias is on every class logit, prompts sit where SigLIP puts them (every block input compared too)."""
  model, params = _build(siglip_bundle, variant, class_probs=class_probs)
  out, seen = _block_inputs(model, params, pixels)
  setup = dict(_setup(model), siglip=True, class_probs=class_probs)
  want, text_inputs, vision_inputs, _ = _np_iqa(_as_numpy(params), setup, pixels.astype(np.float64))
  expected = {"quality_logits", "score", "score01", "scene_logits", "distortion_logits"}
  assert set(out) == expected and set(want) == expected
  for j in range(LAYERS):  # hidden states: atol 3e-5 (measured 1.2e-5 at 1 of 51200 entries)
    np.testing.assert_allclose(seen[("text", j)], np.concatenate([text_inputs[name][j] for name, _ in
                                                                  model.text_ids]), rtol=RTOL, atol=3 * ATOL,
                               err_msg=f"text block {j} input")
    np.testing.assert_allclose(seen[("vision", j)], vision_inputs[j], rtol=RTOL, atol=3 * ATOL,
                               err_msg=f"vision block {j} input")
  for key in sorted(expected):
    np.testing.assert_allclose(out[key], want[key], rtol=RTOL, atol=ATOL, err_msg=key)
