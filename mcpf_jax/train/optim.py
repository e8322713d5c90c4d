"""Which parameters train, and the optimizer over them. Decided here, in one place, from the config.

Freezing is data: `trainable_labels` maps every parameter path ("clip/vision_model/.../kernel") to "trainable" or
"frozen" from regex rules, and `make_optimizer` builds `optax.multi_transform` with `optax.set_to_zero()` for the
frozen label, so no optimizer state (no Adam moments) is ever allocated for the frozen CLIP backbone.
`apply_updates` then passes frozen leaves through untouched (the same buffers, bitwise), rather than adding zeros.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import optax
from flax import traverse_util

TRAINABLE, FROZEN = "trainable", "frozen"

# `config.model.trainable` presets -> regexes of TRAINABLE parameter paths (everything else is frozen).
PRESETS: dict[str, tuple[str, ...]] = {
    "prompts": (r"^(?!clip/).*",),  # prompts, fusion and heads; the CLIP backbone frozen (the method)
    "all": (r".*",),  # full fine-tuning (LIQE-style baseline)
    "none": (),  # zero-shot: nothing trains
}


def _rules(trainable: str | Sequence[str]) -> tuple[str, ...]:
  if isinstance(trainable, str):
    if trainable not in PRESETS:
      raise ValueError(f"model.trainable={trainable!r}: expected one of {sorted(PRESETS)} or a list of regexes")
    return PRESETS[trainable]
  return tuple(trainable)


def trainable_labels(params: Any, trainable: str | Sequence[str] = "prompts") -> Any:
  """A pytree like `params` with "trainable" / "frozen" at every leaf (paths joined with '/')."""
  rules = [re.compile(r) for r in _rules(trainable)]
  flat = traverse_util.flatten_dict(params, sep="/")
  labels = {k: TRAINABLE if any(r.search(k) for r in rules) else FROZEN for k in flat}
  return traverse_util.unflatten_dict(labels, sep="/")


def count(params: Any, labels: Any | None = None, which: str = TRAINABLE) -> int:
  """Number of scalars in `params` (restricted to leaves labelled `which` when labels are given)."""
  if labels is None:
    return sum(int(x.size) for x in jax.tree.leaves(params))
  return sum(int(x.size) for x, l in zip(jax.tree.leaves(params), jax.tree.leaves(labels)) if l == which)


def learning_rate_schedule(config) -> optax.Schedule:
  """Linear warm-up then cosine decay to `lr * final_lr_fraction` over `total_steps`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.lr, warmup_steps=config.warmup_steps,
      decay_steps=max(config.total_steps, config.warmup_steps + 1), end_value=config.lr * config.final_lr_fraction)


def make_optimizer(config, labels: Any) -> optax.GradientTransformation:
  """AdamW (+ optional global-norm clipping) on trainable leaves, `set_to_zero` on frozen ones.

  Args:
    config: the `optim` config block (lr, warmup_steps, total_steps, final_lr_fraction, weight_decay, b1, b2,
      grad_clip_norm).
    labels: from `trainable_labels`.
  """
  inner = [optax.clip_by_global_norm(config.grad_clip_norm)] if config.grad_clip_norm else []
  inner.append(optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2,
                           weight_decay=config.weight_decay))
  # Gradient accumulation is done by the train step over micro-batches (only trainable gradients are summed);
  # optax.MultiSteps would keep a backbone-sized accumulator.
  return optax.multi_transform({TRAINABLE: optax.chain(*inner), FROZEN: optax.set_to_zero()}, labels)


def apply_updates(params: Any, updates: Any, labels: Any) -> Any:
  """`optax.apply_updates` for trainable leaves; frozen leaves are returned as they are (bitwise)."""
  return jax.tree.map(lambda p, u, l: p if l == FROZEN else optax.apply_updates(p, u), params, updates, labels)


def split(params: Any, labels: Any) -> tuple[dict, dict]:
  """(trainable, frozen): two flat dicts {path: leaf} partitioning `params` by `labels`.

  The train step differentiates only the trainable dict, so no backbone weight gradient is ever computed.
  """
  flat_p = traverse_util.flatten_dict(params, sep="/")
  flat_l = traverse_util.flatten_dict(labels, sep="/")
  trainable = {k: v for k, v in flat_p.items() if flat_l[k] == TRAINABLE}
  frozen = {k: v for k, v in flat_p.items() if flat_l[k] == FROZEN}
  return trainable, frozen


def merge(trainable: dict, frozen: dict) -> Any:
  """Inverse of `split`."""
  return traverse_util.unflatten_dict({**trainable, **frozen}, sep="/")
