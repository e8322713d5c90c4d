"""The transformer layers both CLIP towers are built of, in Flax Linen: dense, LayerNorm, attention, MLP, the block.

The pre-LayerNorm block is transformers' `CLIPEncoderLayer`; `LayerStack` chains the blocks (a Python loop, or with
`scan` lax.scans over the same per-layer weights) and writes the deep prompts over a slot of the hidden states between
them (`mcpf_jax.clip.model` describes the prompts). Module names are those of the Hugging Face Flax CLIP
checkpoints (`self_attn/{q,k,v,out}_proj`, `mlp/fc1`, `layer_norm1`, ...).

Attention has two implementations with the same numbers: "fused" (`jax.nn.dot_product_attention`) and
"per_head" (`_attention`, the form XLA's CPU backend runs fastest); `mcpf_jax.clip.tuning` picks one per target.

Precision: float32 parity with transformers (1e-5 relative, tested on CPU) assumes full-precision float32
matmuls; on GPUs/TPUs XLA may use TF32/bf16 passes for float32 by default (`jax.default_matmul_precision`
sets it). A bfloat16 compute dtype feeds bfloat16 to every matmul and to the patch convolution, which
accumulate in float32 and round their result to bfloat16 once (`f32_accumulating`); LayerNorm and the attention
softmax are float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mcpf_jax.clip.config import CLIPTextConfig, CLIPVisionConfig

Array = jax.Array


def _activation(name: str) -> Callable[[Array], Array]:
  """transformers' ACT2FN entries used by CLIP checkpoints ("gelu" is the exact erf form)."""
  if name == "quick_gelu":
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name == "gelu":
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name in ("gelu_new", "gelu_pytorch_tanh"):
    return lambda x: jax.nn.gelu(x, approximate=True)
  if name == "relu":
    return jax.nn.relu
  raise ValueError(f"unsupported hidden_act {name!r}")


def layer_norm(eps: float, dtype: Any, name: str):
  """LayerNorm computed in float32 whatever the compute dtype (its mean and variance need it), returned in
  `dtype`. Two-pass variance, as torch.nn.LayerNorm computes it (the fast E[x^2]-E[x]^2 form costs precision)."""
  norm = nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32, use_fast_variance=False, name=name)
  return lambda x: norm(x).astype(dtype)


def f32_accumulating(dtype: Any, op: Callable = jax.lax.dot_general) -> Callable | None:
  """For a low-precision compute dtype: `op` (lax.dot_general / conv_general_dilated) accumulating in float32
  (`preferred_element_type`) and rounding its result to `dtype` once. None for float32 (the op as it is).

  bf16 x bf16 -> bf16 products summed in bf16 lose precision with the contraction length (768 to 3072 terms here)
  and, on XLA's CPU backend, run slower than the f32-accumulating form (BENCHMARKS.md).
  """
  if jnp.dtype(dtype) == jnp.float32:
    return None

  def accumulate_in_f32(*args, **kwargs):
    kwargs["preferred_element_type"] = jnp.float32
    return op(*args, **kwargs).astype(dtype)

  return accumulate_in_f32


def dense(features: int, dtype: Any, name: str, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
                  dot_general=f32_accumulating(dtype))


def _attention(q: Array, k: Array, v: Array, causal: bool) -> Array:
  """Attention: q [batch, queries, heads, head_dim], k and v [batch, keys, heads, head_dim] -> like q.

  The numerics of `jax.nn.dot_product_attention`'s XLA path (float32 logits scaled by head_dim ** -0.5, the
  causal mask as -0.7 * float32 max, float32 softmax, probabilities cast to the value dtype), computed one head
  at a time: XLA's CPU backend runs the per-head batched matmuls faster than the [batch, heads, ...] einsums
  with their transposes (see BENCHMARKS.md). XLA fuses the per-head slices and the final stack into the
  neighbouring ops. Used for CPU targets only (`Attention.implementation = "per_head"`): elsewhere `Attention`
  calls `jax.nn.dot_product_attention`, so GPUs get the fused kernel.
  """
  scale = q.shape[-1] ** -0.5
  mask = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool)) if causal else None
  big_negative = -0.7 * float(jnp.finfo(jnp.float32).max)
  outs = []
  for h in range(q.shape[2]):
    logits = jnp.einsum("bqd,bkd->bqk", q[:, :, h], k[:, :, h], preferred_element_type=jnp.float32) * scale
    if mask is not None:
      logits = jnp.where(mask, logits, big_negative)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    outs.append(jnp.einsum("bqk,bkd->bqd", probs, v[:, :, h], preferred_element_type=jnp.float32).astype(v.dtype))
  return jnp.stack(outs, axis=2)


ATTENTION = ("fused", "per_head")  # the values of Attention.implementation


class Attention(nn.Module):
  """Multi-head self-attention with separate q/k/v/out projections (HF `CLIPAttention`).

  implementation: "fused" (`jax.nn.dot_product_attention`: cuDNN flash attention on GPUs where it applies, XLA
  elsewhere) or "per_head" (`_attention`, the CPU-tuned form); the same numbers. Chosen by
  `mcpf_jax.clip.tuning.attention_for`.
  """
  num_heads: int
  causal: bool
  dtype: Any = jnp.float32
  implementation: str = "fused"

  @nn.compact
  def __call__(self, x: Array, num_queries: int | None = None) -> Array:
    """[batch, tokens, width] -> [batch, queries, width]: the first `num_queries` tokens (default all) attend.

    Non-causal only when `num_queries` is given (the vision tower's CLS-only last block).
    """
    batch, tokens, width = x.shape
    queries = tokens if num_queries is None else num_queries
    head_dim = width // self.num_heads
    q = dense(width, self.dtype, "q_proj")(x[:, :queries]).reshape(batch, queries, self.num_heads, head_dim)
    k = dense(width, self.dtype, "k_proj")(x).reshape(batch, tokens, self.num_heads, head_dim)
    v = dense(width, self.dtype, "v_proj")(x).reshape(batch, tokens, self.num_heads, head_dim)
    if self.implementation == "per_head":
      out = _attention(q, k, v, self.causal)
    elif self.implementation == "fused":
      # The causal mask as a numpy constant (is_causal=True builds the same one inside the graph, which exporters
      # then carry as bool ops ONNX Runtime has no kernels for); the same numbers. scale = head_dim ** -0.5.
      mask = np.tril(np.ones((queries, tokens), bool))[None, None] if self.causal else None
      out = jax.nn.dot_product_attention(q, k, v, mask=mask)
    else:
      raise ValueError(f"Attention.implementation={self.implementation!r}: expected one of {ATTENTION}")
    return dense(width, self.dtype, "out_proj")(out.reshape(batch, queries, width))


class MLP(nn.Module):
  intermediate_size: int
  hidden_act: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[batch, tokens, width] -> [batch, tokens, width]."""
    h = _activation(self.hidden_act)(dense(self.intermediate_size, self.dtype, "fc1")(x))
    return dense(x.shape[-1], self.dtype, "fc2")(h)


class EncoderLayer(nn.Module):
  """Pre-LayerNorm transformer block (HF `CLIPEncoderLayer`).

  Attributes:
    num_queries: None: every token is updated; k: only the first k tokens are (they still attend to all), and
      the output is [batch, k, width]. Every other operation is per token, so those k rows are exactly the
      full block's; the vision tower uses k = 1 for its last block when only the CLS token is pooled.
  """
  config: CLIPTextConfig | CLIPVisionConfig
  causal: bool
  dtype: Any = jnp.float32
  num_queries: int | None = None
  attention: str = "fused"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[batch, tokens, width] -> [batch, tokens (or num_queries), width]."""
    cfg = self.config
    if self.num_queries is not None and self.causal:
      raise ValueError("num_queries is for non-causal blocks (causal queries would see a shorter past)")
    h = layer_norm(cfg.layer_norm_eps, self.dtype, "layer_norm1")(x)
    if self.num_queries is not None:
      x = x[:, :self.num_queries]
    attention = Attention(cfg.num_attention_heads, self.causal, self.dtype, self.attention, name="self_attn")
    x = x + attention(h, self.num_queries)
    h = layer_norm(cfg.layer_norm_eps, self.dtype, "layer_norm2")(x)
    return x + MLP(cfg.intermediate_size, cfg.hidden_act, self.dtype, name="mlp")(h)


def batched(prompt: Array, batch: int, dtype: Any) -> Array:
  """[n, width] or [batch, n, width] -> [batch, n, width] in the compute dtype."""
  prompt = jnp.asarray(prompt).astype(dtype)
  if prompt.ndim == 2:
    return jnp.broadcast_to(prompt[None], (batch,) + prompt.shape)
  return prompt


def replace_after_first(x: Array, prompt: Array) -> Array:
  """Hidden positions 1..n of [batch, tokens, width] <- prompt [batch, n, width]."""
  n = prompt.shape[1]
  return jnp.concatenate([x[:, :1], prompt, x[:, 1 + n:]], axis=1)


def replace_first(x: Array, prompt: Array) -> Array:
  """Hidden positions 0..n-1 of [batch, tokens, width] <- prompt [batch, n, width] (a text with no start token)."""
  return jnp.concatenate([prompt, x[:, prompt.shape[1]:]], axis=1)


def replace_last(x: Array, prompt: Array) -> Array:
  """The last n positions of [batch, tokens, width] <- prompt [batch, n, width]."""
  return jnp.concatenate([x[:, :x.shape[1] - prompt.shape[1]], prompt], axis=1)


class LayerStack(nn.Module):
  """The blocks, named "0".."L-1" as in HF Flax (`encoder/layers/{i}`), with deep prompts between them.

  Attributes:
    prompt_slot: "after_first" (CLIP text: positions 1..n), "first" (SigLIP text, no start token: positions 0..n-1)
      or "last" (vision: the appended tokens).
    scan: run the blocks as `lax.scan`s over their weights stacked at call time (`_scanned`) instead of a Python
      loop: the compiled program holds one block instead of L. The parameters stay per layer ("0".."L-1", the HF
      layout), so loading, export, freezing and sharding rules see the same tree; the same numbers.
  """
  config: CLIPTextConfig | CLIPVisionConfig
  causal: bool
  prompt_slot: str
  dtype: Any = jnp.float32
  remat: bool = False
  attention: str = "fused"
  scan: bool = False

  @nn.compact
  def __call__(self, x: Array, deep_prompts: Sequence[Array] = (), last_queries: int | None = None) -> Array:
    """x [batch, tokens, width]; deep_prompts[j - 1] enters block j -> [batch, tokens, width].

    `last_queries` = k: the last block updates only the first k tokens (see EncoderLayer.num_queries) and the
    output is [batch, k, width].
    """
    if self.scan and not self.is_initializing():
      return self._scanned(x, deep_prompts, last_queries)
    block = nn.remat(EncoderLayer) if self.remat else EncoderLayer
    replace = _REPLACE[self.prompt_slot]
    layers = self.config.num_hidden_layers
    for i in range(layers):
      if 1 <= i <= len(deep_prompts):
        x = replace(x, batched(deep_prompts[i - 1], x.shape[0], self.dtype))
      queries = last_queries if i == layers - 1 else None
      x = block(self.config, self.causal, self.dtype, queries, self.attention, name=str(i))(x)
    return x

  def _scanned(self, x: Array, deep_prompts: Sequence[Array], last_queries: int | None) -> Array:
    """The loop of `__call__` as at most three runs: blocks 0..J-1, each followed by the prompt of the next block
    (the prompts stacked [J, ...] and scanned with the weights), the unprompted blocks J.., and the last block on
    its own when it updates only `last_queries` tokens. Block i's weights are the per-layer parameters "i",
    stacked along a new leading axis for each run (a layout, not new parameters)."""
    params = self.variables["params"]
    layers, batch = self.config.num_hidden_layers, x.shape[0]
    replace = _REPLACE[self.prompt_slot]

    def apply_block(p: Any, h: Array, queries: int | None) -> Array:
      layer = EncoderLayer(self.config, self.causal, self.dtype, queries, self.attention, parent=None)
      return layer.apply({"params": p}, h)

    # What the backward keeps of each scanned block: with remat, its input only; without, the outputs of its dense
    # layers (`SCAN_SAVED`), the rest recomputed (see SCAN_SAVED).
    policy = None if self.remat else SCAN_SAVED
    apply_block = jax.checkpoint(apply_block, static_argnums=(2,), prevent_cse=False, policy=policy)

    def run(h: Array, lo: int, hi: int, prompts: Array | None = None) -> Array:
      if hi <= lo:
        return h
      stacked = jax.tree.map(lambda *a: jnp.stack(a), *(params[str(i)] for i in range(lo, hi)))

      def body(carry, xs):
        p, prompt = xs
        carry = apply_block(p, carry, None)
        if prompt is not None:
          carry = replace(carry, batched(prompt, batch, self.dtype))
        return carry, None

      return jax.lax.scan(body, h, (stacked, prompts))[0]

    prompts = [jnp.asarray(p) for p in deep_prompts]
    depth = len(prompts)
    if depth and len({p.shape for p in prompts}) > 1:  # shapes differ (e.g. per layer [n, w] and [b, n, w])
      prompts = [batched(p, batch, self.dtype) for p in prompts]
    if depth and len({p.shape for p in prompts}) > 1:  # token counts differ: the prompted blocks one at a time
      for i, prompt in enumerate(prompts):
        x = replace(apply_block(params[str(i)], x, None), batched(prompt, batch, self.dtype))
    elif depth:
      x = run(x, 0, depth, jnp.stack(prompts))
    end = layers - 1 if last_queries is not None else layers
    x = run(x, depth, end)
    if last_queries is not None:
      x = apply_block(params[str(layers - 1)], x, last_queries)
    return x


_REPLACE = {"after_first": replace_after_first, "first": replace_first, "last": replace_last}
# The residuals a scanned block keeps for the backward when remat is off: the outputs of its dense layers (q, k, v,
# out, fc1, fc2); LayerNorm, the activation and the attention matmuls (batched over heads) are recomputed. Saving
# everything JAX's autodiff asks for instead (elementwise intermediates included, which XLA's rematerialisation
# drops in the unrolled stack) needs 25.3 GiB per v5e chip for L/14 MCPF at 32 images (unrolled: 13.3; this: 11.0;
# BENCHMARKS.md "A scanned layer stack").
SCAN_SAVED = jax.checkpoint_policies.dots_with_no_batch_dims_saveable


class Encoder(nn.Module):
  """Holds the `layers` collection, so parameter paths read `encoder/layers/{i}` as in HF Flax."""
  config: CLIPTextConfig | CLIPVisionConfig
  causal: bool
  prompt_slot: str
  dtype: Any = jnp.float32
  remat: bool = False
  attention: str = "fused"
  scan: bool = False

  @nn.compact
  def __call__(self, x: Array, deep_prompts: Sequence[Array] = (), last_queries: int | None = None) -> Array:
    return LayerStack(self.config, self.causal, self.prompt_slot, self.dtype, self.remat, self.attention, self.scan,
                      name="layers")(x, deep_prompts, last_queries)

