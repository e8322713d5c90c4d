"""OpenCLIP checkpoints (open_clip's hub format) on our CLIP towers, without torch.

A folder (or hub repo, e.g. `laion/CLIP-ViT-B-16-laion2B-s34B-b88K`, `laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K`)
written by open_clip's `push_to_hf_hub` / `save_for_hf` holds
  - `open_clip_config.json`: {"model_cfg": open_clip's model config (embed_dim, vision_cfg, text_cfg, quick_gelu,
    ...), "preprocess_cfg": {"mean", "std", ...}};
  - the weights as `open_clip_model.safetensors` (read lazily, tensor by tensor, like `model.safetensors`) and/or
    `open_clip_pytorch_model.bin`, a torch pickle. We never unpickle it ourselves: when torch is importable it is read
    with `torch.load(weights_only=True)` (torch's restricted loader); otherwise the error names the file and the one
    command that converts it (`python -m mcpf_jax.clip.openclip convert FOLDER`, where torch is installed).

The state dict of open_clip's `CLIP` class maps onto `mcpf_jax.clip.model.CLIP`'s tree: `visual.conv1` -> the patch
embedding (OIHW -> HWIO), `visual.class_embedding`, `visual.positional_embedding`, `visual.ln_pre` / `ln_post` ->
`pre_layrnorm` / `post_layernorm`, `visual.proj` [width, embed] -> `visual_projection/kernel` as it is (a Flax kernel
is [in, out]); each `transformer.resblocks.{i}` -> `encoder/layers/{i}`: `attn.in_proj_weight` [3w, w] split into
q/k/v (rows q, k, v) and transposed, `attn.out_proj`, `ln_1`/`ln_2` -> `layer_norm1`/`layer_norm2`, `mlp.c_fc`/`c_proj`
-> `mlp/fc1`/`fc2`; `token_embedding`, `positional_embedding`, `ln_final` -> `final_layer_norm`, `text_projection`
([width, embed] parameter, or with `proj_bias` a Linear [embed, width] + bias), `logit_scale`.

Supported differences (config fields of our towers): GELU or QuickGELU (`quick_gelu`; GELU's tanh form through
`act_kwargs`), the LayerNorm eps (`norm_kwargs`), `text_cfg.pool_type` "argmax" (OpenAI's, the default), "eos",
"first" and "last" (`CLIPTextConfig.pooling`), the text projection's bias (`proj_bias`), `mlp_ratio`, `head_width`,
either `pos_embed_type` (both are stored tables). Ignored because they do not change the features: `patch_dropout`
(training only), `output_tokens`, `text_cfg.final_ln_after_pool` and `pad_id` (open_clip 3.3's CLIP text tower does
not read them). Refused by name, with what is supported: the attentional pooler (`attentional_pool`, CoCa),
`no_ln_pre`, `final_ln_after_pool` and `pool_type` other than "tok" of the vision tower (CLIPA's towers, whose BERT
tokenizer is refused anyway), layer scale (`ls_init_value`), custom attention blocks (`block_type`, `qk_norm`,
`scale_*`, `scaled_cosine_attn`), a bidirectional text tower (`no_causal_mask`), `embed_cls`, `proj_type` "none",
timm vision towers (`timm_model_name`), ModifiedResNets (`layers` as a list), custom text towers (`custom_text`,
`hf_model_name`: transformers' XLM-R, RoBERTa, mT5, ...), CoCa (`multimodal_cfg`), the sigmoid-loss logit bias
(`init_logit_bias`), any tokenizer but CLIP's BPE (`hf_tokenizer_name`, `tokenizer_kwargs` other than
clean="lower", `context_length` other than 77), and normalisation other than OpenAI CLIP's mean/std (the pipeline's).

Tokenizer: open_clip's `SimpleTokenizer` is OpenAI CLIP's BPE (`mcpf_jax.clip.tokenizer.Tokenizer.default()`: the same
ids, cleanup and truncation), but it pads with 0 where OpenAI's pads with `<|endoftext|>`; the tokenizer of a loaded
OpenCLIP model pads with 0 (it matters for "last" pooling). The tokenizer files open_clip's hub export copies from
`openai/clip-vit-large-patch14` are not what open_clip tokenizes with, and are not read.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from mcpf_jax.clip.config import CLIPConfig, CLIPTextConfig, CLIPVisionConfig, _square
from mcpf_jax.clip.init import param_shapes

CONFIG = "open_clip_config.json"
SAFETENSORS = "open_clip_model.safetensors"
PICKLE = "open_clip_pytorch_model.bin"
WEIGHT_FILES = (SAFETENSORS, PICKLE)  # in order of preference
CONVERT_COMMAND = "python -m mcpf_jax.clip.openclip convert {folder}"

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # = mcpf_jax.clip.preprocess's, which every pipeline applies
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
SOT_ID, EOT_ID = 49406, 49407  # CLIP BPE's <start_of_text>, <end_of_text>
CONTEXT_LENGTH = 77
TEXT_POOL_TYPES = ("argmax", "eos", "first", "last")

# open_clip 3.3's CLIPVisionCfg / CLIPTextCfg / model_cfg keys: (default, accepted values or None for "any").
_ANY = None
_BLOCK = {"block_type": (None, (None, "default")), "qk_norm": (False, (False,)),
          "scaled_cosine_attn": (False, (False,)), "scale_heads": (False, (False,)),
          "scale_attn_inner": (False, (False,)), "scale_attn": (False, (False,)), "scale_fc": (False, (False,)),
          "ls_init_value": (None, (None,)), "act_kwargs": (None, _ANY), "norm_kwargs": (None, _ANY),
          "output_tokens": (False, _ANY), "mlp_ratio": (4.0, _ANY), "layers": (12, _ANY), "width": (_ANY, _ANY)}
_VISION = {**_BLOCK, "width": (768, _ANY), "head_width": (64, _ANY), "patch_size": (16, _ANY),
           "image_size": (224, _ANY), "patch_dropout": (0.0, _ANY), "attentional_pool": (False, (False,)),
           "attn_pooler_queries": (256, _ANY), "attn_pooler_heads": (8, _ANY), "no_ln_pre": (False, (False,)),
           "pos_embed_type": ("learnable", ("learnable", "sin_cos_2d")), "final_ln_after_pool": (False, (False,)),
           "pool_type": ("tok", ("tok",)), "timm_model_name": (None, (None,)), "timm_model_pretrained": (False, _ANY),
           "timm_pool": ("avg", _ANY), "timm_proj": ("linear", _ANY), "timm_proj_bias": (False, _ANY),
           "timm_drop": (0.0, _ANY), "timm_drop_path": (None, _ANY)}
_TEXT = {**_BLOCK, "width": (512, _ANY), "context_length": (77, (CONTEXT_LENGTH,)), "vocab_size": (49408, _ANY),
         "hf_tokenizer_name": (None, (None, "")), "tokenizer_mode": (None, (None,)), "tokenizer_kwargs": (None, _ANY),
         "heads": (8, _ANY), "embed_cls": (False, (False,)), "pad_id": (0, _ANY), "eos_id": (2, _ANY),
         "no_causal_mask": (False, (False,)), "final_ln_after_pool": (False, _ANY),
         "pool_type": ("argmax", TEXT_POOL_TYPES), "proj_bias": (False, (False, True)),
         "proj_type": ("linear", ("linear",)), "hf_model_name": (None, (None,)), "hf_model_pretrained": (True, _ANY),
         "hf_proj_type": ("mlp", _ANY), "hf_pooler_type": ("mean_pooler", _ANY)}
_MODEL = {"embed_dim": (_ANY, _ANY), "vision_cfg": (_ANY, _ANY), "text_cfg": (_ANY, _ANY),
          "quick_gelu": (False, (False, True)), "init_logit_scale": (math.log(1 / 0.07), _ANY),
          "init_logit_bias": (None, (None,)), "nonscalar_logit_scale": (False, _ANY), "custom_text": (False, (False,)),
          "output_dict": (_ANY, _ANY)}
_WHY = {
    "attentional_pool": "the attentional pooler (CoCa's) is not implemented: only the class-token pooling",
    "no_ln_pre": "our vision tower always has ln_pre (CLIPA's towers drop it; their BERT tokenizer is refused too)",
    "final_ln_after_pool": "ln_post after pooling is not implemented (CLIPA's vision towers)",
    "vision_cfg.pool_type": "only the class-token pooling of the vision tower is implemented",
    "text_cfg.pool_type": "the text feature must be one position's state",
    "ls_init_value": "layer scale (ls_1/ls_2 gamma) is not implemented",
    "block_type": "only open_clip's default ResidualAttentionBlock is implemented",
    "timm_model_name": "timm vision towers (ConvNeXt, EVA, ...) are not implemented: only open_clip's ViT",
    "hf_model_name": "custom text towers from transformers (XLM-R, RoBERTa, mT5, ...) are not implemented",
    "custom_text": "a custom text tower (CustomTextCLIP, `text.*` weights) is not implemented",
    "hf_tokenizer_name": "only CLIP's BPE tokenizer (open_clip's SimpleTokenizer) is supported",
    "tokenizer_mode": "only CLIP's BPE tokenizer (open_clip's SimpleTokenizer) is supported",
    "context_length": "CLIP's BPE tokenizer here writes 77 positions",
    "embed_cls": "the appended text class token (CoCa) is not implemented",
    "no_causal_mask": "a bidirectional text tower is not implemented: the text attention is causal",
    "proj_type": "a text tower without projection has no feature to compare with the image's",
    "init_logit_bias": "the sigmoid-loss logit bias (SigLIP-style) is not part of our CLIP",
}
for _k in ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc"):
  _WHY[_k] = _WHY["block_type"]


def is_openclip_folder(folder: str | os.PathLike[str]) -> bool:
  """Whether `folder` holds an OpenCLIP checkpoint (open_clip_config.json) and no transformers config.json."""
  folder = pathlib.Path(folder)
  return (folder / CONFIG).is_file() and not (folder / "config.json").is_file()


def _check_keys(cfg: Any, spec: Mapping[str, tuple[Any, Any]], where: str, source: str) -> dict[str, Any]:
  """The dict `cfg` with open_clip's defaults filled in; every key known and every value accepted, else an error
  naming the field, its value and what is supported."""
  if not isinstance(cfg, Mapping):
    raise ValueError(f"{source}: {where} must be a JSON object, got {type(cfg).__name__}")
  unknown = sorted(set(cfg) - set(spec))
  if unknown:
    raise ValueError(f"{source}: {where} has fields open_clip 3.3 does not know: {unknown}")
  out = {k: default for k, (default, _) in spec.items()}
  out.update(cfg)
  for key, (_, accepted) in spec.items():
    value = out[key]
    if accepted is not None and value not in accepted:
      why = _WHY.get(f"{where.rsplit('.', 1)[-1]}.{key}", _WHY.get(key, "not supported"))
      raise ValueError(f"{source}: {where}.{key} = {value!r} is not supported ({why}); supported: "
                       f"{list(accepted)}")
  return out


def _activation(quick_gelu: bool, act_kwargs: Any, where: str, source: str) -> str:
  if not act_kwargs:
    return "quick_gelu" if quick_gelu else "gelu"
  if not quick_gelu and dict(act_kwargs) == {"approximate": "tanh"}:
    return "gelu_pytorch_tanh"
  raise ValueError(f"{source}: {where}.act_kwargs = {act_kwargs!r} is not supported with quick_gelu={quick_gelu} "
                   "(supported: none, or {'approximate': 'tanh'} with GELU)")


def _eps(norm_kwargs: Any, where: str, source: str) -> float:
  if not norm_kwargs:
    return 1e-5  # torch.nn.LayerNorm's default
  if set(norm_kwargs) != {"eps"}:
    raise ValueError(f"{source}: {where}.norm_kwargs = {norm_kwargs!r} is not supported (supported: {{'eps': x}})")
  return float(norm_kwargs["eps"])


def config_from_openclip(raw: Any, *, dtype: str = "float32", remat: bool = False,
                         source: str = CONFIG) -> CLIPConfig:
  """An `open_clip_config.json` dict -> our CLIPConfig, or a ValueError naming the first unsupported field."""
  if not isinstance(raw, Mapping) or not isinstance(raw.get("model_cfg"), Mapping):
    raise ValueError(f"{source}: expected a JSON object with a 'model_cfg' object (open_clip's hub config)")
  model_cfg = dict(raw["model_cfg"])
  if "multimodal_cfg" in model_cfg:
    raise ValueError(f"{source}: model_cfg.multimodal_cfg is set: a CoCa model (captioning decoder), which is not "
                     "supported; only open_clip's CLIP (ViT image tower + CLIP text transformer) is")
  top = _check_keys(model_cfg, _MODEL, "model_cfg", source)
  for key in ("embed_dim", "vision_cfg", "text_cfg"):
    if key not in model_cfg:
      raise ValueError(f"{source}: model_cfg.{key} is missing")
  if isinstance(model_cfg["vision_cfg"], Mapping) and isinstance(model_cfg["vision_cfg"].get("layers"), (list, tuple)):
    raise ValueError(f"{source}: model_cfg.vision_cfg.layers = {model_cfg['vision_cfg']['layers']!r}: a ModifiedResNet "
                     "image tower (RN50, ...), which is not supported; only open_clip's ViT (an int layers) is")
  vis = _check_keys(model_cfg["vision_cfg"], _VISION, "model_cfg.vision_cfg", source)
  txt = _check_keys(model_cfg["text_cfg"], _TEXT, "model_cfg.text_cfg", source)
  kwargs = txt["tokenizer_kwargs"] or {}
  if dict(kwargs) not in ({}, {"clean": "lower"}):
    raise ValueError(f"{source}: model_cfg.text_cfg.tokenizer_kwargs = {kwargs!r} is not supported (only CLIP's "
                     "BPE with its default cleanup: none, or {'clean': 'lower'})")
  _check_preprocess(raw.get("preprocess_cfg"), source)
  quick = bool(top["quick_gelu"])
  sizes = {}
  for key in ("image_size", "patch_size"):
    try:
      sizes[key] = _square(vis[key], key)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{source}: model_cfg.vision_cfg.{key} = {vis[key]!r} is not supported (an int or a square "
                       "pair)") from e
  if txt["vocab_size"] < EOT_ID + 1:
    raise ValueError(f"{source}: model_cfg.text_cfg.vocab_size = {txt['vocab_size']!r} is smaller than CLIP's BPE "
                     f"vocabulary ({EOT_ID + 1} ids), the only tokenizer supported")
  if vis["width"] % vis["head_width"]:
    raise ValueError(f"{source}: model_cfg.vision_cfg.width {vis['width']} is not a multiple of head_width "
                     f"{vis['head_width']}")
  pool = txt["pool_type"]
  try:
    text = CLIPTextConfig(
        vocab_size=int(txt["vocab_size"]), hidden_size=int(txt["width"]),
        intermediate_size=int(txt["width"] * txt["mlp_ratio"]), num_hidden_layers=int(txt["layers"]),
        num_attention_heads=int(txt["heads"]), max_position_embeddings=int(txt["context_length"]),
        hidden_act=_activation(quick, txt["act_kwargs"], "model_cfg.text_cfg", source),
        layer_norm_eps=_eps(txt["norm_kwargs"], "model_cfg.text_cfg", source), bos_token_id=SOT_ID,
        eos_token_id=int(txt["eos_id"]) if pool == "eos" else EOT_ID, pad_token_id=0, pooling=pool)
    vision = CLIPVisionConfig(
        hidden_size=int(vis["width"]), intermediate_size=int(vis["width"] * vis["mlp_ratio"]),
        num_hidden_layers=int(vis["layers"]), num_attention_heads=int(vis["width"] // vis["head_width"]),
        image_size=sizes["image_size"], patch_size=sizes["patch_size"],
        hidden_act=_activation(quick, vis["act_kwargs"], "model_cfg.vision_cfg", source),
        layer_norm_eps=_eps(vis["norm_kwargs"], "model_cfg.vision_cfg", source))
    return CLIPConfig(text=text, vision=vision, projection_dim=int(top["embed_dim"]),
                      logit_scale_init_value=float(top["init_logit_scale"]),
                      text_projection_bias=bool(txt["proj_bias"]), dtype=dtype, remat=remat)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{source}: {e}") from e


def _check_preprocess(cfg: Any, source: str) -> None:
  if cfg is None:
    return
  if not isinstance(cfg, Mapping):
    raise ValueError(f"{source}: preprocess_cfg must be a JSON object, got {type(cfg).__name__}")
  for key, expected in (("mean", OPENAI_MEAN), ("std", OPENAI_STD)):
    value = cfg.get(key)
    if value is not None and not np.allclose(np.broadcast_to(np.asarray(value, float), (3,)), expected, atol=1e-6):
      raise ValueError(f"{source}: preprocess_cfg.{key} = {value!r} is not supported: every pipeline here "
                       f"normalises with OpenAI CLIP's {key} {list(expected)} (mcpf_jax.clip.preprocess)")


def read_config(folder: str | os.PathLike[str], *, dtype: str = "float32", remat: bool = False) -> CLIPConfig:
  """`folder/open_clip_config.json` -> CLIPConfig."""
  path = pathlib.Path(folder) / CONFIG
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: an OpenCLIP folder needs open_clip_config.json")
  try:
    raw = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e
  return config_from_openclip(raw, dtype=dtype, remat=remat, source=str(path))


# ---------------------------------------------------------------------------------------------------------
# Weights.


def _tower_sources(src: str, dst: tuple[str, ...], layers: int) -> dict[tuple[str, ...], tuple[str, Callable]]:
  """{our path: (open_clip key, transform)} for the blocks of one tower; q/k/v slice the fused in_proj."""
  t = lambda a: a.T  # torch Linear [out, in] -> Flax Dense [in, out]
  same = lambda a: a
  out = {}
  for i in range(layers):
    s, d = f"{src}transformer.resblocks.{i}.", dst + ("encoder", "layers", str(i))
    for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
      part = lambda a, j=j: a[j * (a.shape[0] // 3):(j + 1) * (a.shape[0] // 3)]
      out[d + ("self_attn", name, "kernel")] = (s + "attn.in_proj_weight", lambda a, part=part: part(a).T)
      out[d + ("self_attn", name, "bias")] = (s + "attn.in_proj_bias", part)
    for ours, theirs, fn in (("self_attn/out_proj", "attn.out_proj", t), ("mlp/fc1", "mlp.c_fc", t),
                             ("mlp/fc2", "mlp.c_proj", t)):
      out[d + tuple(ours.split("/")) + ("kernel",)] = (s + theirs + ".weight", fn)
      out[d + tuple(ours.split("/")) + ("bias",)] = (s + theirs + ".bias", same)
    for ours, theirs in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2")):
      out[d + (ours, "scale")] = (s + theirs + ".weight", same)
      out[d + (ours, "bias")] = (s + theirs + ".bias", same)
  return out


def key_map(config: CLIPConfig) -> dict[tuple[str, ...], tuple[str, Callable[[np.ndarray], np.ndarray]]]:
  """{our parameter path: (open_clip state-dict key, numpy transform to our layout)} for `config`."""
  same = lambda a: a
  out = {
      ("vision_model", "embeddings", "patch_embedding", "kernel"): ("visual.conv1.weight",
                                                                    lambda a: a.transpose(2, 3, 1, 0)),
      ("vision_model", "embeddings", "class_embedding"): ("visual.class_embedding", same),
      ("vision_model", "embeddings", "position_embedding", "embedding"): ("visual.positional_embedding", same),
      ("vision_model", "pre_layrnorm", "scale"): ("visual.ln_pre.weight", same),
      ("vision_model", "pre_layrnorm", "bias"): ("visual.ln_pre.bias", same),
      ("vision_model", "post_layernorm", "scale"): ("visual.ln_post.weight", same),
      ("vision_model", "post_layernorm", "bias"): ("visual.ln_post.bias", same),
      ("visual_projection", "kernel"): ("visual.proj", same),  # [width, embed]: x @ proj, a Flax kernel as it is
      ("text_model", "embeddings", "token_embedding", "embedding"): ("token_embedding.weight", same),
      ("text_model", "embeddings", "position_embedding", "embedding"): ("positional_embedding", same),
      ("text_model", "final_layer_norm", "scale"): ("ln_final.weight", same),
      ("text_model", "final_layer_norm", "bias"): ("ln_final.bias", same),
      ("logit_scale",): ("logit_scale", lambda a: np.reshape(a, ())),  # [] or [1] (nonscalar_logit_scale)
  }
  if config.text_projection_bias:  # an nn.Linear [embed, width] + bias
    out[("text_projection", "kernel")] = ("text_projection.weight", lambda a: a.T)
    out[("text_projection", "bias")] = ("text_projection.bias", same)
  else:  # a parameter [width, embed]: x @ text_projection
    out[("text_projection", "kernel")] = ("text_projection", same)
  out.update(_tower_sources("visual.", ("vision_model",), config.vision.num_hidden_layers))
  out.update(_tower_sources("", ("text_model",), config.text.num_hidden_layers))
  return out


def to_state_dict(params: Mapping[str, Any], config: CLIPConfig) -> dict[str, np.ndarray]:
  """Our parameter tree -> open_clip's CLIP state dict (float32 numpy; the inverse of `params_from`)."""
  flat = {p: np.asarray(v, np.float32) for p, v in traverse_util.flatten_dict(dict(params)).items()}
  out: dict[str, np.ndarray] = {}
  for path, (key, _) in key_map(config).items():
    a = flat[path]
    if len(path) > 1 and path[-2] in ("q_proj", "k_proj", "v_proj"):
      a = a.T if path[-1] == "kernel" else a
      j = ("q_proj", "k_proj", "v_proj").index(path[-2])
      out.setdefault(key, [None] * 3)[j] = a
      continue
    if path[-1] == "kernel" and a.ndim == 4:
      a = a.transpose(3, 2, 0, 1)
    elif path[-1] == "kernel" and key.endswith(".weight"):
      a = a.T
    out[key] = a
  return {k: np.array(np.concatenate(v) if isinstance(v, list) else v, order="C") for k, v in out.items()}


def params_from(get: Callable[[str], np.ndarray], keys: set[str], config: CLIPConfig, source: str) -> dict[str, Any]:
  """Our float32 tree from a state dict given as `get(key)` over `keys`; every tensor of `config` must be there with
  its shape and nothing else (errors name the tensors and `source`)."""
  shapes = {p: tuple(s.shape) for p, s in traverse_util.flatten_dict(param_shapes(config)).items()}
  mapping = key_map(config)
  assert set(mapping) == set(shapes), sorted(set(mapping) ^ set(shapes))
  wanted = {key for key, _ in mapping.values()}
  missing, unknown = sorted(wanted - keys), sorted(keys - wanted)
  if missing or unknown:
    parts = ([f"missing tensors {missing}"] if missing else []) + ([f"unknown tensors {unknown}"] if unknown else [])
    raise ValueError(f"{source}: {'; '.join(parts)} (expected open_clip's CLIP state dict matching {CONFIG})")
  cache: dict[str, np.ndarray] = {}
  flat, misshaped = {}, []
  for path, (key, fn) in sorted(mapping.items()):
    if key not in cache:
      cache[key] = np.asarray(get(key), np.float32)
    arr = fn(cache[key])
    if tuple(arr.shape) != shapes[path]:
      misshaped.append(f"{key} is {list(cache[key].shape)} (as {'/'.join(path)}: {list(arr.shape)}, expected "
                       f"{list(shapes[path])})")
      continue
    flat[path] = np.array(arr, np.float32, order="C")  # (ascontiguousarray would make a 0-d array 1-d)
  if misshaped:
    raise ValueError(f"{source}: tensors with the wrong shape: {'; '.join(misshaped)}")
  return traverse_util.unflatten_dict(flat)


def _read_safetensors(path: pathlib.Path, config: CLIPConfig) -> dict[str, Any]:
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  with safe_open(str(path), framework="numpy") as f:
    def get(key: str) -> np.ndarray:
      try:
        return f.get_tensor(key)
      except (TypeError, ValueError) as e:  # e.g. bfloat16, which numpy cannot represent
        raise ValueError(f"{path}: cannot read tensor {key} as numpy ({e}); expected float32/float16") from e
    return params_from(get, set(f.keys()), config, str(path))


def torch_available() -> bool:
  return importlib.util.find_spec("torch") is not None


def read_pickle_with_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
  """open_clip_pytorch_model.bin -> {key: numpy array}, through `torch.load(weights_only=True)` (torch's restricted
  unpickler: tensors and containers only). Unwraps {"state_dict": ...} and DistributedDataParallel's `module.`
  prefix as open_clip's `load_state_dict` does."""
  if not torch_available():
    raise ValueError(f"{path} is a PyTorch pickle, which mcpf_jax does not unpickle itself, and torch is not "
                     f"installed here. Convert it once where torch is: `{CONVERT_COMMAND.format(folder=path.parent)}` "
                     f"(writes {SAFETENSORS} beside it), or fetch the repo's {SAFETENSORS}")
  import torch  # pylint: disable=g-import-not-at-top

  try:
    state = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... on a bad or unsafe file
    raise ValueError(f"{path}: torch.load(weights_only=True) cannot read it ({type(e).__name__}: {e})") from e
  if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
    state = state["state_dict"]
  if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
    raise ValueError(f"{path}: expected a state dict of tensors")
  if state and next(iter(state)).startswith("module."):
    state = {k[len("module."):]: v for k, v in state.items()}
  return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()}


def weight_file(folder: str | os.PathLike[str]) -> pathlib.Path:
  """The folder's weight file: open_clip_model.safetensors, else open_clip_pytorch_model.bin."""
  folder = pathlib.Path(folder)
  for name in WEIGHT_FILES:
    if (folder / name).is_file():
      return folder / name
  raise FileNotFoundError(f"{folder}: no OpenCLIP weights found (expected {SAFETENSORS} or {PICKLE})")


def read_params(folder: str | os.PathLike[str], config: CLIPConfig) -> tuple[dict[str, Any], pathlib.Path]:
  """The folder's weights as our float32 numpy tree, and the file they came from."""
  path = weight_file(folder)
  if path.name == SAFETENSORS:
    return _read_safetensors(path, config), path
  state = read_pickle_with_torch(path)
  return params_from(state.__getitem__, set(state), config, str(path)), path


def tokenizer() -> Any:
  """open_clip's SimpleTokenizer as ours: OpenAI CLIP's BPE, 77 positions, padded with 0."""
  from mcpf_jax.clip.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top

  return dataclasses.replace(Tokenizer.default(), pad_token_id=0)


def convert(folder: str | os.PathLike[str]) -> pathlib.Path:
  """Writes `folder/open_clip_model.safetensors` from `folder/open_clip_pytorch_model.bin` (needs torch). The
  tensors keep their names and dtypes (bfloat16 ones become float32); returns the new file."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  folder = pathlib.Path(folder)
  source = folder / PICKLE
  if not source.is_file():
    raise FileNotFoundError(f"{source} not found")
  state = read_pickle_with_torch(source)
  target = folder / SAFETENSORS
  save_file({k: np.array(v, order="C") for k, v in state.items()}, str(target), metadata={"format": "pt"})
  return target


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m mcpf_jax.clip.openclip",
                                   description="OpenCLIP checkpoints: convert the torch pickle to safetensors.")
  sub = parser.add_subparsers(dest="command", required=True)
  c = sub.add_parser("convert", help=f"FOLDER/{PICKLE} -> FOLDER/{SAFETENSORS} (needs torch)")
  c.add_argument("folder")
  args = parser.parse_args(argv)
  print(convert(args.folder))
  return 0


if __name__ == "__main__":
  sys.exit(main())
