"""The optimizer over the trainable parameters.

Which parameters train is the model's `freeze.mask` ("trainable" / "frozen" at every leaf); `make_optimizer`
builds `optax.multi_transform` over that mask with `optax.set_to_zero()` for the frozen leaves, so no optimizer
state (no Adam moments) is ever allocated for the frozen CLIP backbone.
`apply_updates` then passes frozen leaves through untouched (the same buffers, bitwise), rather than adding zeros.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import traverse_util

from mcpf_jax.model import freeze


def learning_rate_schedule(config) -> optax.Schedule:
  """Linear warm-up then cosine decay to `lr * final_lr_fraction` over `total_steps`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.lr, warmup_steps=config.warmup_steps,
      decay_steps=max(config.total_steps, config.warmup_steps + 1), end_value=config.lr * config.final_lr_fraction)


def make_optimizer(config, mask: Any) -> optax.GradientTransformation:
  """AdamW (+ optional global-norm clipping) on trainable leaves, `set_to_zero` on frozen ones.

  Args:
    config: the `optim` config block (lr, warmup_steps, total_steps, final_lr_fraction, weight_decay, b1, b2,
      grad_clip_norm).
    mask: from `freeze.mask`.
  """
  inner = [optax.clip_by_global_norm(config.grad_clip_norm)] if config.grad_clip_norm else []
  inner.append(optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2,
                           weight_decay=config.weight_decay))
  # Gradient accumulation is done by the train step over micro-batches (only trainable gradients are summed);
  # optax.MultiSteps would keep a backbone-sized accumulator.
  return optax.multi_transform({freeze.TRAINABLE: optax.chain(*inner), freeze.FROZEN: optax.set_to_zero()}, mask)


def apply_updates(params: Any, updates: Any, mask: Any) -> Any:
  """`optax.apply_updates` for trainable leaves; frozen leaves are returned as they are (bitwise)."""
  return jax.tree.map(lambda p, u, l: p if l == freeze.FROZEN else optax.apply_updates(p, u), params, updates, mask)


def partition(params: Any, mask: Any) -> tuple[dict, dict]:
  """(trainable, frozen): two flat dicts {path: leaf} partitioning `params` by `mask`.

  The train step differentiates only the trainable dict, so no backbone weight gradient is ever computed.
  """
  flat_p = traverse_util.flatten_dict(params, sep="/")
  flat_l = traverse_util.flatten_dict(mask, sep="/")
  trainable = {k: v for k, v in flat_p.items() if flat_l[k] == freeze.TRAINABLE}
  frozen = {k: v for k, v in flat_p.items() if flat_l[k] == freeze.FROZEN}
  return trainable, frozen


def merge(trainable: dict, frozen: dict) -> Any:
  """Inverse of `partition`."""
  return traverse_util.unflatten_dict({**trainable, **frozen}, sep="/")
