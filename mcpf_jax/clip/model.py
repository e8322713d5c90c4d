"""The CLIP module in Flax Linen: the text and vision towers, projections and logits, with prompt hooks.

Numerically this is transformers' PyTorch `CLIPModel` (pre-LayerNorm blocks, `pre_layrnorm` and
`post_layernorm` on the CLS token in the vision tower, causal attention and end-of-text pooling in the text
tower, bias-free projections, logits = exp(logit_scale) * cosine). OpenCLIP checkpoints (`mcpf_jax.clip.openclip`)
run on the same towers, with two config fields transformers' CLIP lacks: the text pooling rule
(`CLIPTextConfig.pooling`: end-of-text id, largest id, first or last position) and a text-projection bias.
Parameter names are those of the Hugging Face Flax CLIP checkpoints (`flax_model.msgpack`), so those load without
renaming:

  text_model/embeddings/{token_embedding,position_embedding}/embedding
  text_model/encoder/layers/{i}/{self_attn/{q,k,v,out}_proj,mlp/fc1,mlp/fc2}/{kernel,bias}
  text_model/encoder/layers/{i}/{layer_norm1,layer_norm2}/{scale,bias}, text_model/final_layer_norm
  vision_model/embeddings/{class_embedding, patch_embedding/kernel (HWIO), position_embedding/embedding}
  vision_model/{pre_layrnorm,post_layernorm}, vision_model/encoder/layers/{i}/...
  visual_projection/kernel, text_projection/kernel, logit_scale

Prompts (the hook prompt learning plugs into). `prompts` is None or a sequence of J arrays, J <= the tower's
number of layers; element j is [n, width] (shared by the batch) or [batch, n, width]:
  text:   prompts[0] replaces the token embeddings at positions 1..n (right after SOS) before the position
          embedding is added (CoOp); prompts[j], j >= 1, replaces hidden positions 1..n at the input of
          block j (MaPLe deep prompts). Pooling still reads the end-of-text position from the ids, so the
          caller tokenizes n placeholder words there.
  vision: prompts[0] is appended after the patch tokens (after the position embedding, before pre_layrnorm);
          prompts[j], j >= 1, replaces those last n tokens at the input of block j (VPT-deep / MaPLe).
          The CLS token is pooled as in CLIP; prompts are never pooled.
Prompt shapes are static, values are plain arrays: everything jits and differentiates with respect to them.

Precision: see `mcpf_jax.clip.layers` (float32 parity with transformers; bfloat16 compute with float32-accumulating
matmuls). The weights may be stored in float32 or bfloat16 (`clip.load(param_dtype=)`); the logits are float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mcpf_jax.clip.config import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from mcpf_jax.clip.layers import (
  Encoder,
  batched,
  dense,
  f32_accumulating,
  layer_norm,
  replace_after_first,
  replace_first,
)
from mcpf_jax.clip.tuning import attention_for, chunking

Array = jax.Array
Prompts = Sequence[Array] | None


def _check_prompts(prompts: Sequence[Array], batch: int, width: int, layers: int, tower: str) -> None:
  """Shape checks (all static): a clear message instead of a broadcasting error deep inside."""
  if len(prompts) > layers:
    raise ValueError(f"{tower} prompts: got {len(prompts)} prompt sets for {layers} layers")
  for j, p in enumerate(prompts):
    shape = tuple(jnp.shape(p))
    if len(shape) not in (2, 3) or shape[-1] != width or (len(shape) == 3 and shape[0] != batch):
      raise ValueError(f"{tower} prompts[{j}] has shape {shape}; expected [n, {width}] or "
                       f"[{batch}, n, {width}]")


class TextTransformer(nn.Module):
  """HF `CLIPTextModel`: returns the pooled end-of-text state and all final states."""
  config: CLIPTextConfig
  dtype: Any = jnp.float32
  remat: bool = False
  attention: str = "fused"
  scan: bool = False  # scanned layer stack (`layers.LayerStack.scan`)

  @nn.compact
  def __call__(self, ids: Array, prompts: Sequence[Array] = ()) -> tuple[Array, Array]:
    """ids int [batch, tokens] -> (pooled [batch, width], states [batch, tokens, width]).

    `states` are after `final_layer_norm` (HF's `last_hidden_state`).
    """
    cfg = self.config
    batch, tokens = ids.shape
    if tokens > cfg.max_position_embeddings:
      raise ValueError(f"text ids have {tokens} positions; the model has {cfg.max_position_embeddings}")
    _check_prompts(prompts, batch, cfg.hidden_size, cfg.num_hidden_layers, "text")
    for j, p in enumerate(prompts):
      if jnp.shape(p)[-2] + 2 > tokens:
        raise ValueError(f"text prompts[{j}] has {jnp.shape(p)[-2]} tokens; only {tokens - 2} fit between "
                         "SOS and EOS")
    x = TextEmbeddings(cfg, self.dtype, name="embeddings")(ids, prompts[0] if prompts else None)
    x = Encoder(cfg, True, "after_first", self.dtype, self.remat, self.attention, self.scan, name="encoder")(
        x, tuple(prompts[1:]))
    x = layer_norm(cfg.layer_norm_eps, self.dtype, "final_layer_norm")(x)
    rule = cfg.pool_rule
    if rule == "first":
      return x[:, 0], x
    if rule == "last":
      return x[:, -1], x
    if rule == "argmax":
      # Old configs (eos_token_id == 2) and OpenCLIP: the end-of-text token is the largest id in the sequence.
      eos = jnp.argmax(ids, axis=-1)
    else:
      # First end-of-text token (padding may repeat it).
      eos = jnp.argmax(ids == cfg.eos_token_id, axis=-1)
    return x[jnp.arange(batch), eos], x


def end_of_text_span(ids: np.ndarray | Sequence[Sequence[int]], config: CLIPTextConfig) -> int:
  """1 + the largest pooled (end-of-text) position of int ids [rows, tokens], by `TextTransformer`'s rule.

  Attention in the text tower is causal, so a row's pooled state never sees the positions after its end-of-text
  token: `ids[:, :span]` gives the same features as `ids` (class prompts fill a small part of the 77 positions,
  so a fixed set of prompts needs only that part of the text tower). The rule is applied in numpy, to static ids.
  When a row has no end-of-text token (ids not from the tokenizer), nothing is dropped: the span is all the
  positions. Pooling at the first position needs 1 position, at the last one all of them (`pool_rule`).
  """
  ids = np.asarray(ids)
  rule = config.pool_rule
  if rule == "first":  # position 0 sees nothing after it
    return 1
  if rule == "last":  # the last position is the pooled one: nothing can be dropped
    return ids.shape[-1]
  if rule == "argmax":
    eos = np.argmax(ids, axis=-1)
  else:
    is_eos = ids == config.eos_token_id
    if not np.all(np.any(is_eos, axis=-1)):
      return ids.shape[-1]
    eos = np.argmax(is_eos, axis=-1)
  return int(np.max(eos)) + 1


class TextEmbeddings(nn.Module):
  """Token + position embeddings, with the first prompt written over the token embeddings at 1..n."""
  config: CLIPTextConfig
  dtype: Any = jnp.float32
  prompt_slot: str = "after_first"  # SigLIP: "first" (its tokenizers put no start token first)

  @nn.compact
  def __call__(self, ids: Array, prompt: Array | None) -> Array:
    """ids [batch, tokens] -> [batch, tokens, width]."""
    cfg = self.config
    init = nn.initializers.normal(0.02)
    x = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, embedding_init=init,
                 name="token_embedding")(ids)
    if prompt is not None:
      replace = replace_first if self.prompt_slot == "first" else replace_after_first
      x = replace(x, batched(prompt, x.shape[0], x.dtype))
    positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype, embedding_init=init,
                         name="position_embedding")(jnp.arange(ids.shape[1]))
    return x + positions[None]


class VisionTransformer(nn.Module):
  """HF `CLIPVisionModel`: returns the post-LayerNorm CLS state and all final states."""
  config: CLIPVisionConfig
  dtype: Any = jnp.float32
  remat: bool = False
  attention: str = "fused"
  scan: bool = False  # scanned layer stack (`layers.LayerStack.scan`)

  @nn.compact
  def __call__(self, pixels: Array, prompts: Sequence[Array] = (), interpolate_pos_encoding: bool = False,
               pooled_only: bool = False) -> tuple[Array, Array]:
    """pixels [batch, height, width, channels] -> (pooled [batch, width], states [batch, tokens, width]).

    `states` are the output of the last block, before `post_layernorm` (HF's `last_hidden_state`), with
    the appended prompts at the end: tokens = 1 + patches + n. With `pooled_only` the last block updates only
    the CLS token (the pooled state is the same, and most of the last block's work is saved: only its K and V
    projections still see every token) and `states` is [batch, 1, width].
    """
    cfg = self.config
    batch = pixels.shape[0]
    _check_prompts(prompts, batch, cfg.hidden_size, cfg.num_hidden_layers, "vision")
    if any(jnp.shape(p)[-2] != jnp.shape(prompts[0])[-2] for p in prompts[1:]):
      raise ValueError("vision prompts: every layer must have as many tokens as prompts[0] (they replace "
                       f"the appended ones); got {[jnp.shape(p)[-2] for p in prompts]}")
    x = _VisionEmbeddings(cfg, self.dtype, name="embeddings")(pixels, interpolate_pos_encoding)
    if prompts:
      x = jnp.concatenate([x, batched(prompts[0], batch, self.dtype)], axis=1)
    x = layer_norm(cfg.layer_norm_eps, self.dtype, "pre_layrnorm")(x)
    x = Encoder(cfg, False, "last", self.dtype, self.remat, self.attention, self.scan, name="encoder")(
        x, tuple(prompts[1:]), 1 if pooled_only else None)
    pooled = layer_norm(cfg.layer_norm_eps, self.dtype, "post_layernorm")(x[:, 0])
    return pooled, x


class _VisionEmbeddings(nn.Module):
  config: CLIPVisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels: Array, interpolate_pos_encoding: bool = False) -> Array:
    """[batch, height, width, channels] -> [batch, 1 + patches, width] (CLS first, position added)."""
    cfg = self.config
    _, height, width_px, channels = pixels.shape
    if channels != cfg.num_channels:
      raise ValueError(f"pixels have {channels} channels (last axis); the model expects {cfg.num_channels} "
                       "(layout [batch, height, width, channels])")
    if (height, width_px) != (cfg.image_size, cfg.image_size) and not interpolate_pos_encoding:
      raise ValueError(f"pixels are {height}x{width_px}; the model takes {cfg.image_size}x{cfg.image_size} "
                       "(pass interpolate_pos_encoding=True to resize the position embedding)")
    p = cfg.patch_size
    patches = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                      dtype=self.dtype, param_dtype=jnp.float32, name="patch_embedding",
                      conv_general_dilated=f32_accumulating(self.dtype, jax.lax.conv_general_dilated)
                      )(pixels.astype(self.dtype))
    batch, grid_h, grid_w, _ = patches.shape
    patches = patches.reshape(batch, grid_h * grid_w, cfg.hidden_size)  # row-major, as torch's flatten(2)
    cls = self.param("class_embedding", nn.initializers.normal(cfg.hidden_size ** -0.5), (cfg.hidden_size,))
    cls = jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, cfg.hidden_size))
    table = nn.Embed(cfg.num_patches + 1, cfg.hidden_size, dtype=self.dtype,
                     embedding_init=nn.initializers.normal(0.02),
                     name="position_embedding")(jnp.arange(cfg.num_patches + 1))
    if grid_h * grid_w != cfg.num_patches or grid_h != grid_w:
      table = _resize_positions(table, grid_h, grid_w)
    return jnp.concatenate([cls, patches], axis=1) + table[None]


def _resize_positions(table: Array, grid_h: int, grid_w: int) -> Array:
  """[1 + g*g, width] -> [1 + grid_h*grid_w, width], bicubic over the patch grid (CLS row kept).

  Like HF's `interpolate_pos_encoding` in spirit; jax.image's cubic kernel (Keys, a = -0.5) differs from
  torch's bicubic (a = -0.75), so resized embeddings are close to, not equal to, transformers' values.
  """
  grid = round((table.shape[0] - 1) ** 0.5)
  patch = table[1:].reshape(grid, grid, table.shape[1])
  patch = jax.image.resize(patch.astype(jnp.float32), (grid_h, grid_w, table.shape[1]), "cubic",
                           antialias=False).astype(table.dtype)
  return jnp.concatenate([table[:1], patch.reshape(grid_h * grid_w, -1)], axis=0)


class CLIP(nn.Module):
  """The whole CLIP. Methods (call through `model.apply(variables, ..., method=...)`):

  - `encode_image(pixels, prompts=None, return_tokens=False)`: projected (not normalised) image features.
  - `encode_text(ids, prompts=None, return_tokens=False)`: projected (not normalised) text features.
  - `__call__(pixels, ids, image_prompts=None, text_prompts=None)`: logits_per_image [n_img, n_txt].

  Attributes:
    config: the model and its compute options (`image_chunk`: how many images one vision-tower pass encodes).
  """
  config: CLIPConfig

  def setup(self):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    attention = attention_for(cfg.target_platform())
    self.text_model = TextTransformer(cfg.text, dtype, cfg.remat, attention, scan=cfg.scan_layers)
    self.vision_model = VisionTransformer(cfg.vision, dtype, cfg.remat, attention, scan=cfg.scan_layers)
    self.visual_projection = dense(cfg.projection_dim, dtype, "visual_projection", use_bias=False)
    self.text_projection = dense(cfg.projection_dim, dtype, "text_projection", use_bias=cfg.text_projection_bias)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(cfg.logit_scale_init_value), (),
                                  jnp.float32)

  def encode_image(self, pixels: Array, prompts: Prompts = None, return_tokens: bool = False,
                   interpolate_pos_encoding: bool = False) -> Array | tuple[Array, Array]:
    """Image features.

    Args:
      pixels: float [batch, height, width, channels], normalised with CLIP's mean/std.
      prompts: None or J arrays [n, vision_width] / [batch, n, vision_width] (see the module docstring).
      return_tokens: also return the final hidden states.
      interpolate_pos_encoding: allow another input size by resizing the position embedding.

    Returns:
      features float32 [batch, embed_dim] (projected, not normalised), and with `return_tokens` also
      tokens [batch, 1 + patches + n, vision_width] in the compute dtype: the output of the last block
      (before post_layernorm), prompts at the end.
    """
    prompts = tuple(prompts or ())
    n = pixels.shape[0]
    size, padded = chunking(n, self.config.image_chunk, self.config.vision.hidden_size, self.config.target_platform())
    if size >= n:
      return self._encode_image(pixels, prompts, return_tokens, interpolate_pos_encoding)
    # [padded // size, size, ...]: zero images pad the last chunk and are dropped from the output.
    chunks = lambda a: jnp.pad(a, [(0, padded - n)] + [(0, 0)] * (a.ndim - 1)).reshape((padded // size, size)
                                                                                       + a.shape[1:])
    per_image = tuple(jnp.ndim(p) == 3 for p in prompts)  # [batch, n, width] prompts are chunked with the images

    def body(module, carry, xs):
      pixels_chunk, prompt_chunks = xs
      prompt_chunks = iter(prompt_chunks)
      chunk_prompts = tuple(next(prompt_chunks) if b else p for p, b in zip(prompts, per_image))
      return carry, module._encode_image(pixels_chunk, chunk_prompts, return_tokens, interpolate_pos_encoding)

    scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False})
    _, out = scan(self, None, (chunks(pixels), [chunks(p) for p, b in zip(prompts, per_image) if b]))
    return jax.tree.map(lambda a: a.reshape((padded,) + a.shape[2:])[:n], out)

  def _encode_image(self, pixels: Array, prompts: tuple[Array, ...], return_tokens: bool,
                    interpolate_pos_encoding: bool) -> Array | tuple[Array, Array]:
    """`encode_image` of one chunk."""
    pooled, tokens = self.vision_model(pixels, prompts, interpolate_pos_encoding, pooled_only=not return_tokens)
    features = self.visual_projection(pooled).astype(jnp.float32)
    return (features, tokens) if return_tokens else features

  def encode_text(self, ids: Array, prompts: Prompts = None,
                  return_tokens: bool = False) -> Array | tuple[Array, Array]:
    """Text features.

    Args:
      ids: int [batch, tokens] (tokens <= 77), from the CLIP tokenizer; with prompts, the caller put n
        placeholder words at positions 1..n.
      prompts: None or J arrays [n, text_width] / [batch, n, text_width] (see the module docstring).
      return_tokens: also return the final hidden states.

    Returns:
      features float32 [batch, embed_dim] (projected, not normalised), and with `return_tokens` also
      tokens [batch, tokens, text_width] after final_layer_norm, in the compute dtype.
    """
    pooled, tokens = self.text_model(jnp.asarray(ids, jnp.int32), tuple(prompts or ()))
    features = self.text_projection(pooled).astype(jnp.float32)
    return (features, tokens) if return_tokens else features

  def __call__(self, pixels: Array, ids: Array, image_prompts: Prompts = None,
               text_prompts: Prompts = None) -> Array:
    """pixels [n_img, H, W, C], ids [n_txt, tokens] -> logits_per_image float32 [n_img, n_txt]."""
    image = self.encode_image(pixels, image_prompts)
    text = self.encode_text(ids, text_prompts)
    return logits(image, text, self.logit_scale)


def logits(image_features: Array, text_features: Array, logit_scale: Array) -> Array:
  """exp(logit_scale) * cosine similarity: [n_img, D], [n_txt, D] -> [n_img, n_txt] float32."""
  image = image_features.astype(jnp.float32)
  text = text_features.astype(jnp.float32)
  image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
  text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
  return jnp.exp(logit_scale.astype(jnp.float32)) * image @ text.T

