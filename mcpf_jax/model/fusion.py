"""Cross-modal prompt fusion: how the text prompts T_j and the visual prompts V_j of one layer inform each other.

`model.fusion` chooses:
  - "cross_attention" (MCPF): T_j and V_j are projected to a shared width, fused by bidirectional multi-head
    cross-attention (T attends to V, V attends to T; residual + LayerNorm), projected back to their own widths and
    added to the prompts they came from. The fused prompts are what layer j of each tower receives.
  - "linear" (MaPLe coupling): V_j = Linear_j(T_j); no visual prompt parameters of their own.
  - "none": independent prompts.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class CrossAttentionFusion(nn.Module):
  """Bidirectional cross-attention between the text and visual prompts of one layer.

  Attributes:
    width: shared width the two sets of prompts are projected to.
    num_heads: attention heads (must divide `width`).
  """
  width: int = 512
  num_heads: int = 8
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, text: jax.Array, vision: jax.Array) -> tuple[jax.Array, jax.Array]:
    """text [n, text_width], vision [n_v, vision_width] -> fused prompts of the same shapes."""
    dense = lambda name, feats: nn.Dense(feats, dtype=self.dtype, name=name)
    attn = lambda name: nn.MultiHeadDotProductAttention(num_heads=self.num_heads, qkv_features=self.width,
                                                        out_features=self.width, dtype=self.dtype, name=name)
    t = dense("text_in", self.width)(text)
    v = dense("vision_in", self.width)(vision)
    t_fused = nn.LayerNorm(dtype=self.dtype, name="text_norm")(t + attn("text_from_vision")(t, v))
    v_fused = nn.LayerNorm(dtype=self.dtype, name="vision_norm")(v + attn("vision_from_text")(v, t))
    # Projected back to each tower's width and added: the prompts keep their own identity (and their
    # phrase initialisation) while carrying what the other modality contributes.
    text_out = text + dense("text_out", text.shape[-1])(t_fused).astype(text.dtype)
    vision_out = vision + dense("vision_out", vision.shape[-1])(v_fused).astype(vision.dtype)
    return text_out, vision_out


class PromptFusion(nn.Module):
  """Fuses the prompts of every prompted layer j < depth; layers past `depth` are passed through.

  Attributes:
    kind: "cross_attention" | "linear" | "none".
    depth: number of layers whose prompts are fused (those prompted in both towers).
    vision_width: width of the visual prompts ("linear" creates them from the text prompts).
    num_vision_prompts: n_v, for "linear" (must equal the number of text prompts).
  """
  kind: str = "cross_attention"
  depth: int = 0
  width: int = 512
  num_heads: int = 8
  vision_width: int = 768
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, text: list[jax.Array], vision: list[jax.Array] | None
               ) -> tuple[list[jax.Array], list[jax.Array] | None]:
    """text: per layer [n, text_width]; vision: per layer [n_v, vision_width] (None for "linear")."""
    if self.kind == "none":
      return text, vision
    if self.kind == "linear":
      coupled = [nn.Dense(self.vision_width, dtype=self.dtype, name=f"linear_{j}")(text[j])
                 for j in range(self.depth)]
      return text, coupled
    if self.kind != "cross_attention":
      raise ValueError(f"model.fusion={self.kind!r}: expected 'cross_attention', 'linear' or 'none'")
    text, vision = list(text), list(vision)
    for j in range(self.depth):
      text[j], vision[j] = CrossAttentionFusion(self.width, self.num_heads, self.dtype, name=f"layer_{j}")(
          text[j], vision[j])
    return text, vision
