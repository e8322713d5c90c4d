"""Analytic (model) FLOPs of the IQA model's train and eval steps, from its sizes alone.

The count is of the computation as the model is written: the text tower on the class prompts' end-of-text span,
the last vision block on CLS only (when tokens are not returned), both towers' matmuls and attention cores.
Training adds the backward through the activations (d input = d output @ W^T: the forward matmul's FLOPs again;
attention's QK^T and PV need four matmuls backward) and, when the backbone trains (`model.trainable = "all"`),
the weight gradients (d W = x^T @ d output: the forward matmul's FLOPs again, the patch embedding included).
Layer norms, softmax, GELU, the fusion module, heads and the optimizer are left out (< 1% for CLIP towers).
For a single tower layer: forward matmuls 2T(4d^2 + 2dm), attention 4T^2 d (T tokens, d width, m MLP width).
SigLIP (`family == "siglip"`): no class token, every vision block updates every token, and the MAP head (a probe
attending over the patch tokens, then an MLP on it) is counted as one block with one query; no visual projection;
the text head (width -> projection_size) on the last position, as CLIP's text projection on its pooled one.
"""

from __future__ import annotations

from typing import Any


def layer_flops(tokens: int, width: int, mlp: int, queries: int | None = None) -> tuple[float, float]:
  """(matmul FLOPs, attention-core FLOPs) of one pre-LN block's forward on one sequence of `tokens`.

  `queries`: only that many tokens are updated (the vision tower's CLS-only last block): K and V still see all.
  """
  q = tokens if queries is None else queries
  dense = 2 * tokens * width * (2 * width) + 2 * q * width * (2 * width) + 2 * q * width * mlp * 2  # k, v; q, out; mlp
  attention = 2 * 2 * q * tokens * width  # QK^T and PV over all heads (causal masks, XLA computes all)
  return dense, attention


def _tower(layers: int, dense: float, attn: float, dense_last: float, attn_last: float, backward: bool,
           weight_grads: bool) -> float:
  """FLOPs of one sequence through a tower: forward, + activation backward, + weight gradients."""
  mult_dense = 1 + int(backward) + int(weight_grads)
  mult_attn = 1 + 2 * int(backward)
  return (layers - 1) * (mult_dense * dense + mult_attn * attn) + mult_dense * dense_last + mult_attn * attn_last


def step_flops(clip_config: Any, spec: Any, images: int, text_rows: int, text_tokens: int, *, train: bool,
               backbone_trains: bool = False, pooled_only: bool = True) -> dict[str, float]:
  """Model FLOPs of one step.

  Args:
    clip_config: the CLIPConfig.
    spec: the ModelSpec (prompt counts).
    images: images through the vision tower (the global batch; x crops for the eval step).
    text_rows: class prompts through the text tower (25: 5 quality + 9 scene + 11 distortion).
    text_tokens: positions per class prompt as computed (the end-of-text span).
    train: forward + backward (else forward only).
    backbone_trains: the CLIP weights are trained too: add their weight gradients.
    pooled_only: the vision tower's last block updates only CLS (False for MP-IQE, whose head reads all tokens).

  Returns:
    {"vision": ..., "text": ..., "total": ...} FLOPs.
  """
  v, t = clip_config.vision, clip_config.text
  siglip = getattr(clip_config, "family", "clip") == "siglip"
  weight_grads = train and backbone_trains
  prompts = spec.num_vision_prompts if spec.vision_depth > 0 else 0
  v_tokens = int(not siglip) + v.num_patches + prompts
  vd, va = layer_flops(v_tokens, v.hidden_size, v.intermediate_size)
  last_queries = 1 if pooled_only and not siglip else None  # SigLIP's MAP head reads every token's last state
  vdl, val = layer_flops(v_tokens, v.hidden_size, v.intermediate_size, queries=last_queries)
  td, ta = layer_flops(text_tokens, t.hidden_size, t.intermediate_size)
  patch = 2 * v.num_patches * (v.patch_size ** 2 * v.num_channels) * v.hidden_size
  if siglip:
    pooled = v.num_patches + (prompts if getattr(spec, "pool_visual_prompts", False) else 0)
    hd, ha = layer_flops(pooled, v.hidden_size, v.intermediate_size, queries=1)  # the MAP head
    head = _tower(1, hd, ha, hd, ha, train, weight_grads)
    proj_v, proj_t = 0, 2 * t.hidden_size * t.projection_size
  else:
    head = 0
    proj_v = 2 * v.hidden_size * clip_config.projection_dim
    proj_t = 2 * t.hidden_size * clip_config.projection_dim
  mult = 1 + int(train) + int(weight_grads)
  vision = images * (_tower(v.num_hidden_layers, vd, va, vdl, val, train, weight_grads) + head + mult * proj_v
                     + (1 + int(weight_grads)) * patch)  # pixels need no gradient
  text = text_rows * (_tower(t.num_hidden_layers, td, ta, td, ta, train, weight_grads) + mult * proj_t)
  return {"vision": float(vision), "text": float(text), "total": float(vision + text)}
