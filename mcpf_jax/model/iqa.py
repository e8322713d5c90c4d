"""The IQA model: CLIP + learnable multi-layer prompts in both towers + cross-modal prompt fusion + heads.

One module serves every variant the README lists; `ModelSpec.from_config` fills each variant's defaults:

  name      text prompts          visual prompts        fusion            head
  mcpf      depth J, shared ctx   depth J               cross_attention   cosine to class prompts
  maple     depth J, shared ctx   = Linear(text)        linear            cosine to class prompts
  coop      depth 1, shared ctx   none                  none              cosine to class prompts
  mpiqe     depth 1, ctx per set  every layer           none              text features query image tokens
  clipiqa   none                  none                  none              "Good photo." vs "Bad photo."

Quality: p = softmax(logit_scale * cos(image, text_k)) over the L quality classes; score = sum_k p_k (k + 1), i.e.
the expected level on [1, L]; score01 = (score - 1) / (L - 1) on [0, 1]. Auxiliary label sets (scene, distortion)
have their own class prompts and logits.

Backbones: OpenAI-format CLIP (`mcpf_jax.clip.model.CLIP`) and SigLIP / SigLIP 2 at fixed resolution
(`mcpf_jax.clip.siglip.SigLIP`), under the same prompts, fusion and heads. Where SigLIP changes a piece's meaning:
  - logits: SigLIP's are exp(logit_scale) * cos + logit_bias, the backbone's own; every class logit here carries the
    bias. `model.class_probs` reads them: "softmax" (default) over the classes, as for CLIP (the bias cancels; the
    five-level expectation, the cross-entropies and zero-shot CLIP-IQA's two-way softmax keep their meaning), or
    "sigmoid", SigLIP's own per-pair reading, p_k = sigmoid(l_k) / sum_j sigmoid(l_j) (the bias counts: a pair's
    match probability as SigLIP was trained to give it, normalised into a distribution). Both are defensible, hence
    the field; the losses are those of the logits either way (softmax cross-entropies; only the score's p changes).
  - pooling: SigLIP has no class token; its MAP head pools the patch tokens. The visual prompts are dropped before
    it by default (they act through attention in the blocks, as on CLIP, where they are never pooled either);
    `model.pool_visual_prompts` lets the head's probe attend over them too.
  - text prompts: SigLIP's tokenizers put no start token first, so the n context tokens are positions 0..n-1 (CLIP:
    1..n after SOS); the text row keeps its full 64 positions (bidirectional attention, last-position pooling), so
    the class prompts' text span is not cut as CLIP's is.
  - pixels: the model takes CLIP-normalised crops from every caller (the train step, the Scorer, the exports) and
    maps them, exactly, to SigLIP's normalisation (mean = std = 0.5) inside.
  - MP-IQE's text-query head: SigLIP's token states already have the joint width and there is no projection to
    apply; the head's LayerNorm alone brings them to the queries (CLIP: LayerNorm, then the frozen visual projection).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mcpf_jax import classes
from mcpf_jax.clip import preprocess
from mcpf_jax.clip.config import CLIPConfig
from mcpf_jax.clip.model import CLIP, end_of_text_span
from mcpf_jax.clip.siglip import SigLIP, SiglipConfig
from mcpf_jax.model.fusion import PromptFusion

PROMPT_INIT = nn.initializers.normal(0.02)  # every prompt's draw (the phrase init overwrites the first ones)
PLACEHOLDER = "X"  # tokenized in place of each text prompt; its embedding is replaced (CoOp)

VARIANTS = {
    "mcpf": dict(text_depth=None, vision_depth=None, fusion="cross_attention", shared_text_prompts=True,
                 head="cosine"),
    "maple": dict(text_depth=None, vision_depth=None, fusion="linear", shared_text_prompts=True, head="cosine"),
    "coop": dict(text_depth=1, vision_depth=0, fusion="none", shared_text_prompts=True, head="cosine"),
    "mpiqe": dict(text_depth=1, vision_depth=-1, fusion="none", shared_text_prompts=False, head="text_query"),
    "clipiqa": dict(text_depth=0, vision_depth=0, fusion="none", shared_text_prompts=True, head="cosine"),
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Everything the IQA module needs besides CLIP, as hashable values (see configs/base.py for meanings)."""
  name: str = "mcpf"
  text_depth: int = 9
  vision_depth: int = 9
  num_text_prompts: int = 8
  num_vision_prompts: int = 8
  text_prompt_init: str = "a photo of a"
  fusion: str = "cross_attention"
  fusion_width: int = 128
  fusion_heads: int = 4
  shared_text_prompts: bool = True
  head: str = "cosine"
  quality_classes: tuple[str, ...] = classes.QUALITY_LEVELS
  quality_template: str = "{} quality."
  aux: tuple[str, ...] = ("scene", "distortion")
  scene_template: str = "{}."
  distortion_template: str = "{} artifacts."
  query_heads: int = 8
  class_probs: str = "softmax"
  pool_visual_prompts: bool = False

  @classmethod
  def from_config(cls, model_config: Mapping[str, Any], num_layers: int) -> ModelSpec:
    """Builds the spec from `config.model`, applying the variant's defaults to fields left at None/-1."""
    cfg = dict(model_config)
    name = cfg.get("name", "mcpf")
    if name not in VARIANTS:
      raise ValueError(f"model.name={name!r}: expected one of {sorted(VARIANTS)}")
    variant = VARIANTS[name]
    depth = cfg.get("prompt_depth", 9)
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in cfg.items() if k in fields}
    for key in ("text_depth", "vision_depth"):
      value = variant[key]
      value = depth if value is None else (num_layers if value == -1 else value)
      if cfg.get(key) is not None:  # an explicit override wins over the variant
        value = cfg[key]
      kw[key] = min(value, num_layers)
    for key in ("fusion", "shared_text_prompts", "head"):
      kw[key] = cfg[key] if cfg.get(key) is not None else variant[key]
    if name == "clipiqa":  # CLIP-IQA's antonym pair; nothing to learn
      kw.update(quality_classes=("Bad photo.", "Good photo."), quality_template="{}", aux=())
    spec = cls(**kw)
    spec.validate()
    return spec

  def validate(self):
    if self.fusion != "none" and not self.shared_text_prompts:
      raise ValueError("model.fusion needs model.shared_text_prompts=True (one text prompt set to fuse with)")
    if self.fusion == "linear" and self.num_vision_prompts != self.num_text_prompts:
      raise ValueError("model.fusion='linear' (MaPLe) makes visual prompts from text prompts: "
                       f"num_vision_prompts={self.num_vision_prompts} must equal num_text_prompts="
                       f"{self.num_text_prompts}")
    if self.fusion != "none" and (self.text_depth == 0 or self.vision_depth == 0):
      raise ValueError(f"model.fusion={self.fusion!r} needs prompts in both towers (text_depth="
                       f"{self.text_depth}, vision_depth={self.vision_depth})")
    if self.head == "text_query" and not self.aux:
      raise ValueError("model.head='text_query' (MP-IQE) needs auxiliary label sets (model.aux) as queries")
    if self.class_probs not in ("softmax", "sigmoid"):
      raise ValueError(f"model.class_probs={self.class_probs!r}: expected 'softmax' or 'sigmoid'")
    for a in self.aux:
      if a not in ("scene", "distortion"):
        raise ValueError(f"model.aux entry {a!r}: expected 'scene' or 'distortion'")

  @property
  def class_sets(self) -> tuple[str, ...]:
    return ("quality",) + tuple(self.aux)

  def class_phrases(self, class_set: str) -> tuple[str, ...]:
    if class_set == "quality":
      return tuple(self.quality_template.format(c) for c in self.quality_classes)
    if class_set == "scene":
      return tuple(self.scene_template.format(c.replace("_", " ")) for c in classes.SCENES)
    return tuple(self.distortion_template.format(c) for c in classes.DISTORTIONS)


def class_token_ids(spec: ModelSpec, tokenizer) -> dict[str, np.ndarray]:
  """Token ids of every class prompt: {class_set: int32 [classes, 77]}.

  With text prompts, each class reads "X X ... X {phrase}" with `num_text_prompts` placeholders right after SOS,
  whose embeddings the learnable prompts replace.
  """
  prefix = " ".join([PLACEHOLDER] * spec.num_text_prompts) + " " if spec.text_depth > 0 else ""
  if spec.text_depth > 0:
    n = len(tokenizer.encode(prefix.strip()))
    if n != spec.num_text_prompts:
      raise ValueError(f"placeholder {PLACEHOLDER!r} x {spec.num_text_prompts} tokenizes to {n} tokens")
  return {s: np.asarray(tokenizer([prefix + p for p in spec.class_phrases(s)]), np.int32) for s in spec.class_sets}


def _normalize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class TextQueryHead(nn.Module):
  """MP-IQE's head: the auxiliary class text features query the image tokens through cross-attention.

  Each query (one per scene / distortion class) gathers the image evidence for its class; the class logit is the
  scaled cosine between what it gathered and its own text feature. The mean gathered evidence, projected, is added
  to the image feature that meets the quality prompts.
  """
  num_heads: int = 8
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, queries: jax.Array, tokens: jax.Array, image: jax.Array) -> tuple[jax.Array, jax.Array]:
    """queries [Q, D], tokens [B, T, D], image [B, D] -> (evidence [B, Q, D], quality feature [B, D])."""
    q = jnp.broadcast_to(queries[None].astype(self.dtype), (tokens.shape[0],) + queries.shape)
    attended = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype, name="attention")(
        q, tokens.astype(self.dtype))
    evidence = nn.LayerNorm(dtype=self.dtype, name="norm")(attended)
    quality = image + nn.Dense(image.shape[-1], dtype=self.dtype, name="to_quality")(
        jnp.mean(evidence, axis=1)).astype(image.dtype)
    return evidence, quality


class IQAModel(nn.Module):
  """CLIP with learnable prompts and the quality / auxiliary heads.

  Attributes:
    clip_config: the backbone (see mcpf_jax.clip).
    spec: the variant and its switches.
    text_ids: {class_set: int32 [classes, 77]} from `class_token_ids`, as nested tuples (hashable).
    text_sharding: None, or a NamedSharding whose spec's first entry names the mesh axes to spread the class-prompt
      rows over (mcpf_jax.train.step.jit_steps sets P("data") on a mesh with a data axis of more than one device,
      P(("data", "model")) with a backbone stored split, mesh.GatherOnce):
      the rows are padded to a multiple of those axes' size, each device encodes its part, the features (a few KB)
      are gathered, and the backward reduces the prompt gradients over the devices. The same numbers as None,
      where every device encodes every row.
  """
  clip_config: CLIPConfig | SiglipConfig
  spec: ModelSpec
  text_ids: tuple[tuple[str, tuple[tuple[int, ...], ...]], ...]
  text_sharding: Any = None

  def setup(self):
    s, c = self.spec, self.clip_config
    if isinstance(c, SiglipConfig):
      self.clip = SigLIP(c, pool_prompts=s.pool_visual_prompts)
    else:
      if s.pool_visual_prompts:
        raise ValueError("model.pool_visual_prompts is for SigLIP backbones (MAP-head pooling); CLIP pools its "
                         "class token")
      self.clip = CLIP(c)
    dtype = jnp.dtype(c.dtype)
    groups = ("all",) if s.shared_text_prompts else s.class_sets
    if s.text_depth > 0:
      self.text_prompts = {g: self.param(f"text_prompts_{g}", PROMPT_INIT,
                                         (s.text_depth, s.num_text_prompts, c.text.hidden_size))
                           for g in groups}
    if s.vision_depth > 0 and s.fusion != "linear":
      self.vision_prompts = self.param("vision_prompts", PROMPT_INIT,
                                       (s.vision_depth, s.num_vision_prompts, c.vision.hidden_size))
    if s.fusion != "none":
      self.fusion = PromptFusion(kind=s.fusion, depth=min(s.text_depth, s.vision_depth), width=s.fusion_width,
                                 num_heads=s.fusion_heads, vision_width=c.vision.hidden_size, dtype=dtype)
    if s.head == "text_query":
      self.query_head = TextQueryHead(num_heads=s.query_heads, dtype=dtype)
      self.token_norm = nn.LayerNorm(dtype=dtype)

  @property
  def text_span(self) -> int:
    """Positions of the class prompts the text tower computes: up to the last end-of-text token of any row.

    The rest (padding to 77) cannot change the pooled features (causal attention, see
    `clip.model.end_of_text_span`); dropping it makes the text tower's cost that of the span, not of 77
    positions. Never shorter than SOS + the text prompts + EOS, where the prompts are written.
    """
    if isinstance(self.clip_config, SiglipConfig):  # bidirectional, last-position pooling: every position counts
      return len(self.text_ids[0][1][0])
    span = end_of_text_span(np.concatenate([np.asarray(rows, np.int32) for _, rows in self.text_ids]),
                            self.clip_config.text)
    return max(span, self.spec.num_text_prompts + 2 if self.spec.text_depth > 0 else 1)

  def prompts(self) -> tuple[dict[str, list[jax.Array]] | None, list[jax.Array] | None]:
    """The prompts every layer receives, after fusion: ({group: [text_depth x [n, tw]]}, [vision_depth x [n_v, vw]])."""
    s = self.spec
    text = {g: list(p) for g, p in self.text_prompts.items()} if s.text_depth > 0 else None
    vision = list(self.vision_prompts) if s.vision_depth > 0 and s.fusion != "linear" else None
    if s.fusion != "none":
      fused_text, fused_vision = self.fusion(text["all"], vision)
      text = {"all": fused_text}
      # Layers deeper than the text depth keep their own (unfused) visual prompts.
      vision = list(fused_vision) + (vision[len(fused_vision):] if vision is not None else [])
    return text, vision

  def encode_classes(self, text_prompts: dict[str, list[jax.Array]] | None) -> dict[str, jax.Array]:
    """{class_set: normalised class text features [classes, D]} in one pass of the text tower."""
    sets = [name for name, _ in self.text_ids]
    ids = [jnp.asarray(np.asarray(rows, np.int32)) for _, rows in self.text_ids]
    all_ids = jnp.concatenate(ids, axis=0)[:, :self.text_span]
    prompts = None
    if text_prompts is not None:
      if "all" in text_prompts:
        prompts = text_prompts["all"]
      else:  # one prompt set per label set: give each row its own set's prompts, [rows, n, width] per layer
        prompts = [jnp.concatenate([jnp.broadcast_to(text_prompts[name][j], (len(i),) + text_prompts[name][j].shape)
                                    for name, i in zip(sets, ids)], axis=0)
                   for j in range(self.spec.text_depth)]
    if self.text_sharding is None:
      feats = _normalize(self.clip.encode_text(all_ids, prompts))
    else:
      feats = self._encode_sharded(all_ids, prompts)
    out, start = {}, 0
    for name, i in zip(sets, ids):
      out[name] = feats[start:start + i.shape[0]]
      start += i.shape[0]
    return out

  def _encode_sharded(self, ids: jax.Array, prompts: list[jax.Array] | None) -> jax.Array:
    """`_normalize(encode_text(ids, prompts))` with the rows spread over `text_sharding`'s first axes, gathered."""
    sharding = self.text_sharding
    axes = sharding.spec[0] if isinstance(sharding.spec[0], tuple) else (sharding.spec[0],)
    shards = int(np.prod([sharding.mesh.shape[a] for a in axes]))
    rows = ids.shape[0]
    pad = -rows % shards

    def spread(x: jax.Array) -> jax.Array:  # rows padded with copies of row 0 (sliced off below), then spread
      if pad:
        x = jnp.concatenate([x, jnp.broadcast_to(x[:1], (pad,) + x.shape[1:])], axis=0)
      return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(
          sharding.spec[0], *([None] * (x.ndim - 1)))))

    if prompts is not None and prompts and prompts[0].ndim == 3:  # per-row prompt sets
      prompts = [spread(p) for p in prompts]
    feats = spread(_normalize(self.clip.encode_text(spread(ids), prompts)))
    gathered = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return jax.lax.with_sharding_constraint(feats, gathered)[:rows]

  def __call__(self, pixels: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """pixels float32 [B, H, W, 3], CLIP-normalised (for every backbone) -> dict of per-image outputs.

    Returns: "score" [B] expected quality level on [1, L]; "score01" [B] on [0, 1]; "quality_logits" [B, L];
    "scene_logits" [B, 9] / "distortion_logits" [B, 11] when model.aux has them.
    """
    del train  # the same computation in training and evaluation: the model has no dropout or batch statistics
    if isinstance(self.clip_config, SiglipConfig):  # SigLIP's own normalisation, from CLIP's (exact, affine)
      pixels = preprocess.renormalize(pixels, preprocess.SIGLIP_MEAN, preprocess.SIGLIP_STD)
    text_prompts, vision_prompts = self.prompts()
    class_features = self.encode_classes(text_prompts)
    scale = jnp.exp(jnp.reshape(self.clip.logit_scale, ()).astype(jnp.float32))
    siglip = isinstance(self.clip_config, SiglipConfig)
    bias = jnp.reshape(self.clip.logit_bias, ()).astype(jnp.float32) if siglip else 0.0
    out = {}
    if self.spec.head == "text_query":
      image, tokens = self.clip.encode_image(pixels, vision_prompts, return_tokens=True)
      # Into the joint space through CLIP's own (frozen) projection, after a LayerNorm of the head's.
      tokens = self.token_norm(tokens)
      tokens = (tokens if siglip else self.clip.visual_projection(tokens)).astype(jnp.float32)
      queries = jnp.concatenate([class_features[a] for a in self.spec.aux], axis=0)
      evidence, quality_feat = self.query_head(queries, tokens, image)
      evidence = _normalize(evidence)
      start = 0
      for a in self.spec.aux:
        k = class_features[a].shape[0]
        out[f"{a}_logits"] = scale * jnp.sum(evidence[:, start:start + k] * class_features[a][None], axis=-1) + bias
        start += k
      image = _normalize(quality_feat)
    else:
      image = _normalize(self.clip.encode_image(pixels, vision_prompts))
      for a in self.spec.aux:
        out[f"{a}_logits"] = scale * image @ class_features[a].T + bias
    logits = scale * image @ class_features["quality"].T + bias
    if self.spec.class_probs == "sigmoid":
      match = jax.nn.sigmoid(logits)
      probs = match / jnp.sum(match, axis=-1, keepdims=True)
    else:
      probs = jax.nn.softmax(logits, axis=-1)
    levels = jnp.arange(1, logits.shape[-1] + 1, dtype=jnp.float32)
    out["quality_logits"] = logits
    out["score"] = probs @ levels
    out["score01"] = (out["score"] - 1.0) / (logits.shape[-1] - 1)
    return out
