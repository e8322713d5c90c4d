"""SigLIP (and SigLIP 2 at fixed resolution) in Flax Linen: both towers, the MAP pooling head, sigmoid logits.

Numerically this is transformers' PyTorch `SiglipModel`. What differs from CLIP (`mcpf_jax.clip.model`):
- vision: the patch convolution has a bias; there is no class token and no `pre_layrnorm`; `post_layernorm` is
  applied to every token, and the image feature is the MAP head's output (`SiglipMultiheadAttentionPoolingHead`:
  a learned probe attends over the tokens through a torch `nn.MultiheadAttention`, then a residual
  LayerNorm + MLP); no projection after it;
- text: attention is bidirectional (no causal mask; SigLIP is trained with every row padded to the full
  `max_position_embeddings`, 64, and no attention mask, which is how transformers' own examples call it); the
  feature is the LAST position's state after `final_layer_norm`, through a `head` Linear with a bias;
- logits = exp(logit_scale) * cosine + logit_bias, read through a sigmoid (each image-text pair on its own), where
  CLIP's are read through a softmax over the texts.
The blocks are CLIP's (`mcpf_jax.clip.layers.Encoder`: pre-LayerNorm, the same parameter names), with SigLIP's
gelu (tanh form) and LayerNorm eps 1e-6 taken from the config.

SigLIP 2's fixed-resolution checkpoints (`google/siglip2-base-patch16-224`, `-so400m-patch14-384`, ...) are
`SiglipModel`s (config.json `model_type: "siglip"`): the same towers, another tokenizer (Gemma's). The NaFlex
variants (`model_type: "siglip2"`, variable resolution and aspect ratio) are refused by name.

Parameter tree (the PyTorch state-dict names with `/`, Linear/Conv `weight` as Flax `kernel` in Flax layout,
LayerNorm `weight` as `scale`, Embedding `weight` as `embedding`; `mcpf_jax.clip.checkpoint` converts):
  text_model/embeddings/{token_embedding,position_embedding}/embedding, text_model/encoder/layers/{i}/...,
  text_model/final_layer_norm, text_model/head/{kernel,bias}
  vision_model/embeddings/patch_embedding/{kernel,bias}, vision_model/embeddings/position_embedding/embedding,
  vision_model/encoder/layers/{i}/..., vision_model/post_layernorm,
  vision_model/head/{probe, attention/{in_proj_weight,in_proj_bias,out_proj/{kernel,bias}}, layernorm, mlp/...}
  logit_scale [1], logit_bias [1]
`in_proj_weight` keeps torch's [3 * width, width] layout (q, k, v stacked), as it is stored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcpf_jax.clip.config import PLATFORMS, SUPPORTED_DTYPES, CLIPVisionConfig, _check_tower, _square, resolve_platform
from mcpf_jax.clip.layers import MLP, Encoder, _attention, batched, dense, f32_accumulating, layer_norm
from mcpf_jax.clip.model import TextEmbeddings, _check_prompts
from mcpf_jax.clip.tuning import attention_for

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SiglipTextConfig:
  """The text tower (transformers' `SiglipTextConfig` defaults: SigLIP B/16)."""
  vocab_size: int = 32000
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 64
  hidden_act: str = "gelu_pytorch_tanh"
  layer_norm_eps: float = 1e-6
  projection_size: int | None = None  # the head's output size; None: hidden_size
  pad_token_id: int | None = 1
  bos_token_id: int | None = 49406
  eos_token_id: int | None = 49407

  def __post_init__(self):
    _check_tower(self, "text_config")
    if self.projection_size is None:
      object.__setattr__(self, "projection_size", self.hidden_size)


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig(CLIPVisionConfig):
  """The vision tower (transformers' `SiglipVisionConfig` defaults: SigLIP B/16 at 224); CLIP's fields, with the
  head switch. `num_patches` is every token here (no class token).

  The image size need not be a multiple of the patch size: the patch convolution drops the remainder, as
  transformers' does (google/siglip2-so400m-patch14-384 takes 384 x 384 pixels and sees 27 x 27 patches of 14)."""
  patch_size: int = 16
  hidden_act: str = "gelu_pytorch_tanh"
  layer_norm_eps: float = 1e-6
  vision_use_head: bool = True

  def __post_init__(self):
    _check_tower(self, "vision_config")
    if self.image_size < self.patch_size:
      raise ValueError(f"vision_config.image_size {self.image_size} is smaller than patch_size {self.patch_size}")


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
  """A whole SigLIP: the two towers and the compute options (dtype, remat, scan_layers, platform as in
  `CLIPConfig`)."""
  text: SiglipTextConfig = dataclasses.field(default_factory=SiglipTextConfig)
  vision: SiglipVisionConfig = dataclasses.field(default_factory=SiglipVisionConfig)
  dtype: str = "float32"
  remat: bool = False
  scan_layers: bool = False
  platform: str | None = None

  family = "siglip"

  def __post_init__(self):
    if self.dtype not in SUPPORTED_DTYPES:
      raise ValueError(f"SiglipConfig.dtype {self.dtype!r} is not one of {SUPPORTED_DTYPES}")
    if self.platform is not None and self.platform not in PLATFORMS:
      raise ValueError(f"SiglipConfig.platform {self.platform!r} is not one of {PLATFORMS} (or None)")
    if not self.vision.vision_use_head:
      raise ValueError("vision_config.vision_use_head is false: such a SigLIP vision tower has no pooled image "
                       "feature to compare with the text (only SiglipVisionModel's token states)")
    if self.text.projection_size != self.vision.hidden_size:
      raise ValueError(f"text_config.projection_size {self.text.projection_size} differs from the vision width "
                       f"{self.vision.hidden_size}: the two features could not be compared")

  @property
  def embed_dim(self) -> int:
    return self.vision.hidden_size

  def target_platform(self) -> str:
    return resolve_platform(self.platform)

  def replace(self, **changes: Any) -> SiglipConfig:
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_hf(cls, config: Mapping[str, Any], *, dtype: str = "float32", remat: bool = False,
              source: str = "config.json") -> SiglipConfig:
    """From a Hugging Face `SiglipModel` config.json dict (missing keys take transformers' defaults)."""
    if not isinstance(config, Mapping):
      raise ValueError(f"{source}: expected a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type == "siglip2":
      raise ValueError(f"{source}: model_type 'siglip2' is SigLIP 2's NaFlex variant (variable resolution and "
                       "aspect ratio), which is not supported; the fixed-resolution SigLIP 2 checkpoints "
                       "(e.g. google/siglip2-base-patch16-224, model_type 'siglip') are")
    if model_type != "siglip":
      raise ValueError(f"{source}: model_type is {model_type!r}, expected 'siglip' (a transformers SiglipModel)")
    towers = {}
    for key, tower_cls in (("text", SiglipTextConfig), ("vision", SiglipVisionConfig)):
      names = {f.name for f in dataclasses.fields(tower_cls)}
      kwargs = {k: v for k, v in (config.get(f"{key}_config") or {}).items() if k in names and v is not None}
      if key == "vision":
        for name in ("image_size", "patch_size"):
          if name in kwargs:
            kwargs[name] = _square(kwargs[name], name)
      try:
        towers[key] = tower_cls(**kwargs)
      except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from e
    try:
      return cls(text=towers["text"], vision=towers["vision"], dtype=dtype, remat=remat)
    except ValueError as e:
      raise ValueError(f"{source}: {e}") from e


def _siglip2(width: int, mlp: int, layers: int, patch: int, image: int, text_width: int | None = None,
             text_mlp: int | None = None, text_layers: int | None = None) -> SiglipConfig:
  """A fixed-resolution SigLIP 2 (Gemma's 256k-id vocabulary, 64 text positions, 16 heads unless B, as released)."""
  heads = 12 if width == 768 else 16
  text = SiglipTextConfig(vocab_size=256000, hidden_size=text_width or width, intermediate_size=text_mlp or mlp,
                          num_hidden_layers=text_layers or layers, num_attention_heads=heads, projection_size=width)
  vision = SiglipVisionConfig(hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
                              num_attention_heads=heads, image_size=image, patch_size=patch)
  return SiglipConfig(text=text, vision=vision)


# Hub ids whose configs are known without a download (for config checks and pre-flight; the weights still load from
# the hub): Google's fixed-resolution SigLIP 2 releases. Sizes from their config.json files and open_clip / timm's
# matching configs: B/16 is transformers' SigLIP defaults (768 wide, 12 layers, MLP 3072); L/16 1024, 24, 4096;
# So400m 1152, 27, 4304 (both towers); giant-opt/16's vision tower is 1536 wide, 40 layers, MLP 6144, with So400m's
# text tower projected to 1536.
HUB_CONFIGS = {
    **{f"google/siglip2-base-patch16-{n}": _siglip2(768, 3072, 12, 16, n) for n in (224, 256, 384, 512)},
    **{f"google/siglip2-large-patch16-{n}": _siglip2(1024, 4096, 24, 16, n) for n in (256, 384, 512)},
    **{f"google/siglip2-so400m-patch14-{n}": _siglip2(1152, 4304, 27, 14, n) for n in (224, 384)},
    **{f"google/siglip2-so400m-patch16-{n}": _siglip2(1152, 4304, 27, 16, n) for n in (256, 384, 512)},
    **{f"google/siglip2-giant-opt-patch16-{n}": _siglip2(1536, 6144, 40, 16, n, 1152, 4304, 27) for n in (256, 384)},
}


class _TorchMultiheadAttention(nn.Module):
  """torch `nn.MultiheadAttention(batch_first=True)` for queries that differ from the keys/values."""
  num_heads: int
  dtype: Any = jnp.float32
  implementation: str = "fused"

  @nn.compact
  def __call__(self, query: Array, x: Array) -> Array:
    """query [batch, q, width], x [batch, tokens, width] -> [batch, q, width]."""
    width = x.shape[-1]
    weight = self.param("in_proj_weight", nn.initializers.xavier_uniform(), (3 * width, width), jnp.float32)
    bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * width,), jnp.float32)
    head_dim = width // self.num_heads

    def project(inputs: Array, part: int) -> Array:
      w = weight[part * width:(part + 1) * width].astype(self.dtype)
      out = jnp.einsum("btd,ed->bte", inputs.astype(self.dtype), w, preferred_element_type=jnp.float32)
      out = (out + bias[part * width:(part + 1) * width]).astype(self.dtype)
      return out.reshape(inputs.shape[0], inputs.shape[1], self.num_heads, head_dim)

    q, k, v = project(query, 0), project(x, 1), project(x, 2)
    if self.implementation == "per_head":
      out = _attention(q, k, v, causal=False)
    else:
      out = jax.nn.dot_product_attention(q, k, v)
    return dense(width, self.dtype, "out_proj")(out.reshape(query.shape[0], query.shape[1], width))


class MAPHead(nn.Module):
  """transformers' `SiglipMultiheadAttentionPoolingHead`: [batch, tokens, width] -> [batch, width]."""
  config: SiglipVisionConfig
  dtype: Any = jnp.float32
  attention: str = "fused"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    probe = self.param("probe", nn.initializers.normal(1.0), (1, 1, cfg.hidden_size), jnp.float32)
    probe = jnp.broadcast_to(probe.astype(self.dtype), (x.shape[0], 1, cfg.hidden_size))
    h = _TorchMultiheadAttention(cfg.num_attention_heads, self.dtype, self.attention, name="attention")(probe, x)
    h = h + MLP(cfg.intermediate_size, cfg.hidden_act, self.dtype, name="mlp")(
        layer_norm(cfg.layer_norm_eps, self.dtype, "layernorm")(h))
    return h[:, 0]


class _VisionEmbeddings(nn.Module):
  config: SiglipVisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels: Array) -> Array:
    """[batch, height, width, channels] -> [batch, patches, width] (no class token; position added)."""
    cfg = self.config
    _, height, width_px, channels = pixels.shape
    if channels != cfg.num_channels:
      raise ValueError(f"pixels have {channels} channels (last axis); the model expects {cfg.num_channels} "
                       "(layout [batch, height, width, channels])")
    if (height, width_px) != (cfg.image_size, cfg.image_size):
      raise ValueError(f"pixels are {height}x{width_px}; the model takes {cfg.image_size}x{cfg.image_size}")
    p = cfg.patch_size
    patches = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=True,
                      dtype=self.dtype, param_dtype=jnp.float32, name="patch_embedding",
                      conv_general_dilated=f32_accumulating(self.dtype, jax.lax.conv_general_dilated)
                      )(pixels.astype(self.dtype))
    batch = patches.shape[0]
    patches = patches.reshape(batch, cfg.num_patches, cfg.hidden_size)  # row-major, as torch's flatten(2)
    table = nn.Embed(cfg.num_patches, cfg.hidden_size, dtype=self.dtype, name="position_embedding")(
        jnp.arange(cfg.num_patches))
    return patches + table[None]


class VisionTransformer(nn.Module):
  """transformers' `SiglipVisionModel`: (MAP-pooled feature [batch, width], post-LayerNorm states).

  Prompts as CLIP's (`mcpf_jax.clip.model`): prompts[0] is appended after the patch tokens (after the position
  embedding), prompts[j], j >= 1, replaces them at the input of block j. There is no class token: the MAP head pools
  the patch tokens only, the prompts dropped before it (they act through attention in the blocks, as CLIP's prompts
  reach its class token), unless `pool_prompts`, where the head's probe attends over them too.
  """
  config: SiglipVisionConfig
  dtype: Any = jnp.float32
  remat: bool = False
  attention: str = "fused"
  pool_prompts: bool = False
  scan: bool = False  # scanned layer stack (`layers.LayerStack.scan`)

  @nn.compact
  def __call__(self, pixels: Array, prompts: Sequence[Array] = ()) -> tuple[Array, Array]:
    cfg = self.config
    batch = pixels.shape[0]
    _check_prompts(prompts, batch, cfg.hidden_size, cfg.num_hidden_layers, "vision")
    if any(jnp.shape(p)[-2] != jnp.shape(prompts[0])[-2] for p in prompts[1:]):
      raise ValueError("vision prompts: every layer must have as many tokens as prompts[0] (they replace "
                       f"the appended ones); got {[jnp.shape(p)[-2] for p in prompts]}")
    x = _VisionEmbeddings(cfg, self.dtype, name="embeddings")(pixels)
    if prompts:
      x = jnp.concatenate([x, batched(prompts[0], batch, self.dtype)], axis=1)
    x = Encoder(cfg, False, "last", self.dtype, self.remat, self.attention, self.scan, name="encoder")(
        x, tuple(prompts[1:]))
    x = layer_norm(cfg.layer_norm_eps, self.dtype, "post_layernorm")(x)
    pooled_tokens = x if self.pool_prompts else x[:, :cfg.num_patches]
    return MAPHead(cfg, self.dtype, self.attention, name="head")(pooled_tokens), x


class TextTransformer(nn.Module):
  """transformers' `SiglipTextModel`: (head(last position's state) [batch, projection], final states).

  Prompts: prompts[0] replaces the token embeddings at positions 0..n-1 (SigLIP's tokenizers put no start token
  first; `mcpf_jax.clip.siglip_tokenizer`), prompts[j], j >= 1, those hidden positions at the input of block j.
  The pooled state stays the last position's (the row is padded to the full length, as SigLIP was trained).
  """
  config: SiglipTextConfig
  dtype: Any = jnp.float32
  remat: bool = False
  attention: str = "fused"
  scan: bool = False  # scanned layer stack (`layers.LayerStack.scan`)

  @nn.compact
  def __call__(self, ids: Array, prompts: Sequence[Array] = ()) -> tuple[Array, Array]:
    cfg = self.config
    batch, tokens = ids.shape
    if tokens > cfg.max_position_embeddings:
      raise ValueError(f"text ids have {tokens} positions; the model has {cfg.max_position_embeddings}")
    _check_prompts(prompts, batch, cfg.hidden_size, cfg.num_hidden_layers, "text")
    for j, p in enumerate(prompts):
      if jnp.shape(p)[-2] + 1 > tokens:
        raise ValueError(f"text prompts[{j}] has {jnp.shape(p)[-2]} tokens; only {tokens - 1} fit before <eos>")
    x = TextEmbeddings(cfg, self.dtype, "first", name="embeddings")(ids, prompts[0] if prompts else None)
    x = Encoder(cfg, False, "first", self.dtype, self.remat, self.attention, self.scan, name="encoder")(
        x, tuple(prompts[1:]))
    x = layer_norm(cfg.layer_norm_eps, self.dtype, "final_layer_norm")(x)
    return dense(cfg.projection_size, self.dtype, "head")(x[:, -1]), x


class SigLIP(nn.Module):
  """The whole SigLIP. Methods (through `model.apply(variables, ..., method=...)`):

  - `encode_image(pixels, prompts=None, return_tokens=False)`: the MAP-pooled image features, float32
    [batch, width] (not normalised); with `return_tokens` also the post-LayerNorm states [batch, patches + n, width]
    (no projection exists: the states have the joint width);
  - `encode_text(ids, prompts=None, return_tokens=False)`: the text features, float32 [batch, width] (not
    normalised); ids padded to the full `max_position_embeddings` as SigLIP was trained (the pooled state is the
    last position's);
  - `__call__(pixels, ids, image_prompts=None, text_prompts=None)`: logits_per_image float32 [n_img, n_txt] =
    exp(logit_scale) * cosine + logit_bias.
  Prompts: see `VisionTransformer` and `TextTransformer` (the same contract as `mcpf_jax.clip.model.CLIP`'s).

  Attributes:
    pool_prompts: the MAP head pools the appended visual prompts too (default: the patch tokens only).
  """
  config: SiglipConfig
  pool_prompts: bool = False

  def setup(self):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    attention = attention_for(cfg.target_platform())
    self.text_model = TextTransformer(cfg.text, dtype, cfg.remat, attention, scan=cfg.scan_layers)
    self.vision_model = VisionTransformer(cfg.vision, dtype, cfg.remat, attention, self.pool_prompts,
                                          scan=cfg.scan_layers)
    self.logit_scale = self.param("logit_scale", nn.initializers.zeros, (1,), jnp.float32)
    self.logit_bias = self.param("logit_bias", nn.initializers.zeros, (1,), jnp.float32)

  def encode_image(self, pixels: Array, prompts: Sequence[Array] | None = None,
                   return_tokens: bool = False) -> Array | tuple[Array, Array]:
    pooled, tokens = self.vision_model(pixels, tuple(prompts or ()))
    return (pooled.astype(jnp.float32), tokens) if return_tokens else pooled.astype(jnp.float32)

  def encode_text(self, ids: Array, prompts: Sequence[Array] | None = None,
                  return_tokens: bool = False) -> Array | tuple[Array, Array]:
    pooled, tokens = self.text_model(jnp.asarray(ids, jnp.int32), tuple(prompts or ()))
    return (pooled.astype(jnp.float32), tokens) if return_tokens else pooled.astype(jnp.float32)

  def __call__(self, pixels: Array, ids: Array, image_prompts: Sequence[Array] | None = None,
               text_prompts: Sequence[Array] | None = None) -> Array:
    return logits(self.encode_image(pixels, image_prompts), self.encode_text(ids, text_prompts), self.logit_scale,
                  self.logit_bias)


def logits(image_features: Array, text_features: Array, logit_scale: Array, logit_bias: Array) -> Array:
  """exp(logit_scale) * cosine + logit_bias: [n_img, D], [n_txt, D] -> [n_img, n_txt] float32 (read through a
  sigmoid: the probability that each image-text pair matches)."""
  image = image_features.astype(jnp.float32)
  text = text_features.astype(jnp.float32)
  image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
  text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
  scale = jnp.exp(jnp.reshape(logit_scale, ()).astype(jnp.float32))
  return scale * image @ text.T + jnp.reshape(logit_bias, ()).astype(jnp.float32)


def param_shapes(config: SiglipConfig) -> dict[str, Any]:
  """The parameter tree of `config` as `jax.ShapeDtypeStruct`s, without computing anything."""
  size = config.vision.image_size
  pixels = jax.ShapeDtypeStruct((1, size, size, config.vision.num_channels), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, config.text.max_position_embeddings), jnp.int32)
  return jax.eval_shape(SigLIP(config).init, jax.random.key(0), pixels, ids)["params"]
