"""Which parameters train: the model's parameter paths -> "trainable" | "frozen", from `config.model.trainable`.

Freezing is data: `mask` maps every parameter path ("clip/vision_model/.../kernel") to TRAINABLE or FROZEN from
regex rules. The optimizer (mcpf_jax.train.optim) and the parameter counts (mcpf_jax.model.summary) both read it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
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


def mask(params: Any, trainable: str | Sequence[str] = "prompts") -> Any:
  """A pytree like `params` with "trainable" / "frozen" at every leaf (paths joined with '/')."""
  rules = [re.compile(r) for r in _rules(trainable)]
  flat = traverse_util.flatten_dict(params, sep="/")
  return traverse_util.unflatten_dict({k: TRAINABLE if any(r.search(k) for r in rules) else FROZEN for k in flat},
                                      sep="/")


def count(params: Any, mask: Any | None = None, which: str = TRAINABLE) -> int:
  """Number of scalars in `params` (restricted to the leaves marked `which` when a mask is given)."""
  if mask is None:
    return sum(int(x.size) for x in jax.tree.leaves(params))
  return sum(int(x.size) for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m == which)
