"""CLIP configuration: frozen dataclasses that read and write Hugging Face `config.json` (CLIPConfig) dicts.

Field names are the Hugging Face ones (`hidden_size`, `num_hidden_layers`, ...) so a config.json maps one to
one. `dtype` (compute dtype) and `remat` (rematerialise each transformer block) are run-time choices of
ours: they are not part of the Hugging Face format, `from_hf` takes them as arguments and `to_hf` leaves
them out. Parameters are always stored in float32.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping
from typing import Any

# Activations of `transformers.activations.ACT2FN` we implement (the CLIP family uses the first two).
SUPPORTED_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
SUPPORTED_DTYPES = ("float32", "bfloat16")
# How the text tower pools its states (`CLIPTextConfig.pooling`); None is transformers' rule (see `pool_rule`).
TEXT_POOLINGS = ("eos", "argmax", "first", "last")
# Platforms a model can be compiled for; the platform picks the attention path and the image-chunk default.
PLATFORMS = ("cpu", "gpu", "tpu")

# The OpenAI CLIP sizes and where their weights live on the Hugging Face hub.
HUB_IDS = {
    "vit-b-32": "openai/clip-vit-base-patch32",
    "vit-b-16": "openai/clip-vit-base-patch16",
    "vit-l-14": "openai/clip-vit-large-patch14",
    "vit-l-14-336": "openai/clip-vit-large-patch14-336",
}


def resolve_platform(platform: str | None) -> str:
  """`platform`, or else (None) the default backend of this process.

  The one place the platform-dependent code paths are decided; modules never ask `jax.default_backend()`.
  """
  if platform is not None:
    return platform
  import jax  # pylint: disable=g-import-not-at-top  (the configs themselves need no jax)
  return jax.default_backend()


def _square(value: Any, name: str) -> int:
  """HF accepts `image_size`/`patch_size` as an int or a pair; the CLIP towers need square ones."""
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f"vision_config.{name} must be an int or a square pair, got {value!r}")
    value = value[0]
  return int(value)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """The text tower (Hugging Face `CLIPTextConfig` defaults, i.e. OpenAI ViT-B text sizes)."""
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  bos_token_id: int = 49406
  eos_token_id: int = 49407
  pad_token_id: int = 1
  # Not a transformers field (OpenCLIP's `text_pool_type`, `mcpf_jax.clip.openclip`): None is transformers' rule.
  pooling: str | None = None

  def __post_init__(self):
    _check_tower(self, "text_config")
    if self.pooling is not None and self.pooling not in TEXT_POOLINGS:
      raise ValueError(f"text_config.pooling {self.pooling!r} is not one of {TEXT_POOLINGS} (or None)")

  @property
  def legacy_eos_pooling(self) -> bool:
    """Configs written before transformers PR #24773 say eos_token_id == 2: pool at argmax(ids) instead."""
    return self.pooling is None and self.eos_token_id == 2

  @property
  def pool_rule(self) -> str:
    """Which state is the text feature: "eos" (the first `eos_token_id`), "argmax" (the largest id: OpenAI CLIP's
    end-of-text token), "first" or "last" (a fixed position). `pooling`, or transformers' rule when it is None
    (argmax for the legacy configs with eos_token_id 2, else eos)."""
    if self.pooling is not None:
      return self.pooling
    return "argmax" if self.legacy_eos_pooling else "eos"


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """The vision tower (Hugging Face `CLIPVisionConfig` defaults, i.e. OpenAI ViT-B/32)."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  def __post_init__(self):
    _check_tower(self, "vision_config")
    if self.image_size % self.patch_size:
      raise ValueError(f"vision_config.image_size {self.image_size} is not a multiple of patch_size "
                       f"{self.patch_size}")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


def _check_tower(cfg: CLIPTextConfig | CLIPVisionConfig, where: str) -> None:
  if cfg.hidden_size % cfg.num_attention_heads:
    raise ValueError(f"{where}.hidden_size {cfg.hidden_size} is not a multiple of num_attention_heads "
                     f"{cfg.num_attention_heads}")
  if cfg.hidden_act not in SUPPORTED_ACTIVATIONS:
    raise ValueError(f"{where}.hidden_act {cfg.hidden_act!r} is not supported (expected one of "
                     f"{SUPPORTED_ACTIVATIONS})")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """A whole CLIP: two towers, the shared embedding size and the compute options.

  Attributes:
    text: the text tower.
    vision: the vision tower.
    projection_dim: size of the joint image-text embedding (`embed_dim`).
    logit_scale_init_value: initial log temperature (only used by `init_random`; loaded weights carry theirs).
    text_projection_bias: the text projection has a bias (OpenCLIP's `proj_bias`; transformers' CLIP has none).
    dtype: compute dtype, "float32" or "bfloat16" (parameters stay float32).
    remat: wrap every transformer block in `jax.checkpoint` (saves activation memory when training prompts).
    scan_layers: run each tower's blocks as a `lax.scan` (one compiled block instead of L; the parameter tree,
      the checkpoints and the numbers are the same: `mcpf_jax.clip.layers.LayerStack.scan`).
    image_chunk: images per vision-tower pass: a larger batch is encoded as a sequence (lax.scan) of chunks of at
      most this many images (the same numbers: images never interact). None: the target's default
      (`tuning.chunking`): 8 on a CPU target, whose caches favour the smaller matmuls (see BENCHMARKS.md), for
      towers at least `tuning.CPU_CHUNK_MIN_WIDTH` wide, and the whole batch on GPUs/TPUs; 0: the whole batch.
    platform: the platform the model is compiled FOR ("cpu" | "gpu" | "tpu"), which picks the CPU-tuned or the
      fused attention path and the image-chunk default (see `mcpf_jax.clip.tuning`). None: the process's default
      backend, i.e. where it runs; an ahead-of-time compile for another target (`mcpf_jax.aot`) sets it.
  """
  text: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
  vision: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592
  text_projection_bias: bool = False
  dtype: str = "float32"
  remat: bool = False
  scan_layers: bool = False
  image_chunk: int | None = None
  platform: str | None = None

  def __post_init__(self):
    if self.dtype not in SUPPORTED_DTYPES:
      raise ValueError(f"CLIPConfig.dtype {self.dtype!r} is not one of {SUPPORTED_DTYPES}")
    if self.platform is not None and self.platform not in PLATFORMS:
      raise ValueError(f"CLIPConfig.platform {self.platform!r} is not one of {PLATFORMS} (or None: the default "
                       "backend)")

  def target_platform(self) -> str:
    """The platform the model compiles for (see `resolve_platform`)."""
    return resolve_platform(self.platform)

  @property
  def embed_dim(self) -> int:
    return self.projection_dim

  def replace(self, **changes: Any) -> CLIPConfig:
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_hf(cls, config: Mapping[str, Any], *, dtype: str = "float32", remat: bool = False,
              source: str = "config.json") -> CLIPConfig:
    """Builds a config from a Hugging Face CLIP `config.json` dict.

    Missing keys take transformers' defaults, as `transformers.CLIPConfig` does; the legacy
    `text_config_dict`/`vision_config_dict` entries of old hub configs override `text_config`/`vision_config`
    the same way. Keys that do not change the computation (dropout, initializer ranges, ...) are ignored.

    Args:
      config: the parsed config.json.
      dtype: compute dtype.
      remat: rematerialise transformer blocks.
      source: where `config` came from, named in errors.
    """
    if not isinstance(config, Mapping):
      raise ValueError(f"{source}: expected a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type", "clip")
    if model_type != "clip":
      raise ValueError(f"{source}: model_type is {model_type!r}, expected 'clip' (a transformers CLIPModel)")
    towers = {}
    for key, tower_cls in (("text", CLIPTextConfig), ("vision", CLIPVisionConfig)):
      merged = dict(config.get(f"{key}_config") or {})
      merged.update(config.get(f"{key}_config_dict") or {})
      names = {f.name for f in dataclasses.fields(tower_cls)}
      kwargs = {k: v for k, v in merged.items() if k in names and v is not None}
      if key == "vision":
        for name in ("image_size", "patch_size"):
          if name in kwargs:
            kwargs[name] = _square(kwargs[name], name)
      if key == "text" and isinstance(kwargs.get("eos_token_id"), (list, tuple)):
        raise ValueError(f"{source}: text_config.eos_token_id must be one int, got {kwargs['eos_token_id']!r}")
      try:
        towers[key] = tower_cls(**kwargs)
      except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from e
    top = {}
    if config.get("projection_dim") is not None:
      top["projection_dim"] = int(config["projection_dim"])
    if config.get("logit_scale_init_value") is not None:
      top["logit_scale_init_value"] = float(config["logit_scale_init_value"])
    if config.get("text_projection_bias") is not None:  # ours (see `to_hf`)
      top["text_projection_bias"] = bool(config["text_projection_bias"])
    return cls(text=towers["text"], vision=towers["vision"], dtype=dtype, remat=remat, **top)

  def to_hf(self) -> dict[str, Any]:
    """The Hugging Face `config.json` dict (`transformers.CLIPModel` loads it).

    The two fields transformers' CLIP does not have (`text_config.pooling`, `text_projection_bias`, set for
    OpenCLIP checkpoints) are written only when set: such a folder loads here, not as a transformers CLIPModel.
    """
    text = dataclasses.asdict(self.text)
    if text["pooling"] is None:
      del text["pooling"]
    text.update(model_type="clip_text_model", projection_dim=self.projection_dim)
    vision = dataclasses.asdict(self.vision)
    vision.update(model_type="clip_vision_model", projection_dim=self.projection_dim)
    extra = {"text_projection_bias": True} if self.text_projection_bias else {}
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "text_config": text,
        "vision_config": vision,
        "projection_dim": self.projection_dim,
        "logit_scale_init_value": self.logit_scale_init_value,
        "initializer_factor": 1.0,
        "dtype": "float32",
        **extra,
    }


def _openai(text_width: int, text_heads: int, vision_width: int, vision_heads: int, vision_layers: int,
            patch: int, image: int, embed: int) -> CLIPConfig:
  return CLIPConfig(
      text=CLIPTextConfig(hidden_size=text_width, intermediate_size=4 * text_width, num_hidden_layers=12,
                          num_attention_heads=text_heads),
      vision=CLIPVisionConfig(hidden_size=vision_width, intermediate_size=4 * vision_width,
                              num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
                              image_size=image, patch_size=patch),
      projection_dim=embed)


PRESETS: dict[str, CLIPConfig] = {
    "vit-b-32": _openai(512, 8, 768, 12, 12, patch=32, image=224, embed=512),
    "vit-b-16": _openai(512, 8, 768, 12, 12, patch=16, image=224, embed=512),
    "vit-l-14": _openai(768, 12, 1024, 16, 24, patch=14, image=224, embed=768),
    "vit-l-14-336": _openai(768, 12, 1024, 16, 24, patch=14, image=336, embed=768),
}


def preset(name: str, **changes: Any) -> CLIPConfig:
  """One of the OpenAI sizes ("vit-b-32", "vit-b-16", "vit-l-14", "vit-l-14-336"), optionally changed."""
  if name not in PRESETS:
    raise ValueError(f"unknown CLIP preset {name!r}; expected one of {sorted(PRESETS)}")
  return PRESETS[name].replace(**changes)


def from_name(name: str) -> CLIPConfig:
  """The CLIP config named by a preset, an OpenAI hub id (mapped to its preset: no download) or a local folder's
  config.json. No weights are read."""
  if name in PRESETS:
    return PRESETS[name]
  by_hub = {v: k for k, v in HUB_IDS.items()}
  if name in by_hub:
    return PRESETS[by_hub[name]]
  from mcpf_jax.clip import siglip  # pylint: disable=import-outside-toplevel  (siglip imports this module)
  if name in siglip.HUB_CONFIGS:
    return siglip.HUB_CONFIGS[name]
  path = pathlib.Path(name).expanduser() / "config.json"
  if path.exists():
    raw = json.loads(path.read_text())
    if isinstance(raw, dict) and raw.get("model_type") in ("siglip", "siglip2"):
      return siglip.SiglipConfig.from_hf(raw, source=str(path))
    return CLIPConfig.from_hf(raw, source=str(path))
  if (path.parent / "open_clip_config.json").exists():
    from mcpf_jax.clip import openclip  # pylint: disable=g-import-not-at-top  (it imports this module)
    return openclip.read_config(path.parent)
  raise ValueError(f"clip.name={name!r}: not a preset {sorted(PRESETS)}, an OpenAI or SigLIP 2 hub id "
                   f"({sorted(siglip.HUB_CONFIGS)}), or a folder with config.json (or OpenCLIP's "
                   "open_clip_config.json)")
