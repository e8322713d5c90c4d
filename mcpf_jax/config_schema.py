"""The config's fields and their types: every field a config in configs/ may hold, as `block.field` -> type.

What each field means, and its default, is the comment beside it in configs/base.py; this is the contract the code
relies on. tests/test_configs.py checks that every config file matches it and that every `config.x.y` the code reads
(found by parsing the source) is declared here, so a field is added in three places: base.py, here, the reader.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

Dtype = Literal["float32", "bfloat16"]

# Every config has these.
FIELDS: dict[str, Any] = {
    "seed": int,
    "plugins": tuple[str, ...],  # modules registering generated backbones / datasets (resolve.load_plugins)
    "clip.name": str,
    "clip.revision": str | None,
    "clip.dtype": Dtype,
    "clip.param_dtype": Dtype,
    "clip.remat": bool,
    "clip.scan_layers": bool,
    "clip.image_chunk": int | None,
    "model.name": Literal["mcpf", "maple", "coop", "mpiqe", "clipiqa"],
    "model.prompt_depth": int,
    "model.text_depth": int | None,
    "model.vision_depth": int | None,
    "model.num_text_prompts": int,
    "model.num_vision_prompts": int,
    "model.text_prompt_init": str,
    "model.fusion": Literal["cross_attention", "linear", "none"] | None,
    "model.fusion_width": int,
    "model.fusion_heads": int,
    "model.shared_text_prompts": bool | None,
    "model.quality_classes": tuple[str, ...],
    "model.quality_template": str,
    "model.aux": tuple[str, ...],
    "model.scene_template": str,
    "model.distortion_template": str,
    "model.query_heads": int,
    "model.class_probs": Literal["softmax", "sigmoid"],
    "model.pool_visual_prompts": bool,
    "model.trainable": str | tuple[str, ...],  # prompts | all | none, or regexes of trainable parameter paths
    "loss.rank": float,
    "loss.l1": float,
    "loss.cls": float,
    "loss.aux": float,
    "data.name": str,
    "data.data_dir": str,
    "data.manual_dir": str | None,
    "data.split_protocol": Literal["seed", "official"],
    "data.split_seed": int,
    "data.train_fraction": float,
    "data.val_fraction": float,
    "data.resize": int,
    "data.image_size": int | None,
    "data.prefetch_to_device": int,
    "data.num_workers": int,
    "train.batch_size": int,
    "train.num_epochs": int,
    "train.accumulate_steps": int,
    "train.log_every": int,
    "train.checkpoint_every": int,
    "train.checkpoint_minutes": float,
    "train.keep": int,
    "optim.lr": float,
    "optim.warmup_steps": int,
    "optim.total_steps": int | None,
    "optim.final_lr_fraction": float,
    "optim.weight_decay": float,
    "optim.b1": float,
    "optim.b2": float,
    "optim.grad_clip_norm": float,
    "eval.num_crops": int,
    "eval.batch_size": int,
    "eval.dataset": str | None,
    "eval.checkpoint": str,  # best | latest | a step number
    "mesh.data": int,
    "mesh.model": int,
    "mesh.shard_backbone": bool,
    "checkpoint_dir": str,
    "init_from": str | None,
    "init_from_checkpoint": str,
    "num_splits": int,
}

# Fields a plugin (config.plugins) reads, declared by it on import (`declare`) for the configs that load it: e.g.
# mcpf_jax.smoke's tiny CLIP sizes, `clip.tiny`. A dict-typed field is one field (its keys are the plugin's).
OPTIONAL: dict[str, Any] = {}


def declare(field: str, tp: Any) -> None:
  """Declares a config field that a plugin reads; declaring it again with the same type does nothing.

  Raises:
    ValueError: `field` is a built-in field, or was declared with another type.
  """
  if field in FIELDS:
    raise ValueError(f"{field}: a built-in config field; a plugin cannot declare it again")
  if OPTIONAL.get(field, tp) != tp:
    raise ValueError(f"{field}: declared as {_describe(OPTIONAL[field])}, now as {_describe(tp)}")
  OPTIONAL[field] = tp


def declared(field: str) -> bool:
  """True for a dotted field of FIELDS or OPTIONAL, or one inside an OPTIONAL mapping (`clip.tiny.width`)."""
  if field in FIELDS or field in OPTIONAL:
    return True
  return any(field.startswith(k + ".") and OPTIONAL[k] is dict for k in OPTIONAL)


def _is_mapping(value: Any) -> bool:
  """A dict, Mapping or ml_collections.ConfigDict (which is not a Mapping)."""
  return isinstance(value, Mapping) or (hasattr(value, "keys") and hasattr(value, "items"))


def _conforms(value: Any, tp: Any) -> bool:
  origin = typing.get_origin(tp)
  if origin in (Union, types.UnionType):
    return any(_conforms(value, t) for t in typing.get_args(tp))
  if origin is Literal:
    return value in typing.get_args(tp)
  if origin is tuple:  # tuple[X, ...]; a list in a saved run.json
    return isinstance(value, (tuple, list)) and all(_conforms(v, typing.get_args(tp)[0]) for v in value)
  if tp is type(None):
    return value is None
  if tp is dict:
    return _is_mapping(value)
  if tp is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if tp is int:
    return isinstance(value, int) and not isinstance(value, bool)
  return isinstance(value, tp)


def _describe(tp: Any) -> str:
  origin = typing.get_origin(tp)
  if origin in (Union, types.UnionType):
    return " or ".join(_describe(t) for t in typing.get_args(tp))
  if origin is Literal:
    return " | ".join(repr(a) for a in typing.get_args(tp))
  if origin is tuple:
    return f"a tuple of {_describe(typing.get_args(tp)[0])}"
  return "None" if tp is type(None) else tp.__name__


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if _is_mapping(v) and f"{prefix}{k}" not in OPTIONAL:
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def problems(config: Any) -> list[str]:
  """What in `config` (a ConfigDict or mapping) differs from the schema: one line per field, naming its value and
  what was expected. Empty when it conforms."""
  flat = _flatten(config)
  out = [f"{k}: missing (expected {_describe(tp)})" for k, tp in FIELDS.items() if k not in flat]
  for k, v in flat.items():
    tp = FIELDS.get(k, OPTIONAL.get(k))
    if tp is None:
      out.append(f"{k}: not a config field (the fields are those of mcpf_jax/config_schema.py and those the "
                 "modules of config.plugins declare)")
    elif not _conforms(v, tp):
      out.append(f"{k}: {v!r} is not {_describe(tp)}")
  return out


def validate(config: Any, where: str = "config") -> None:
  """Raises ValueError listing every field of `config` that is missing, unknown or of another type."""
  found = problems(config)
  if found:
    raise ValueError(f"{where} does not match the config schema:\n  " + "\n  ".join(found))
