"""The exported model folder (`python -m mcpf_jax.export`): what a user needs to score images, and nothing else.

  config.json         format, the model config, the preprocessing (resize, crop size, crops), the score mapping
                      (scale, range, direction), the backbone reference (hub id, revision, fingerprint), the
                      training run's identity (dataset, split protocol, step, metrics)
  model.safetensors   the model's own parameters (prompts, fusion, heads: every leaf outside the CLIP backbone,
                      and any trained backbone leaf), float32, keys "fusion/layer_0/text_in/kernel"; no optimizer
  README.md           the model card (Hugging Face format: YAML metadata + text)
  clip/               only with --include_backbone: the CLIP backbone as a Hugging Face CLIP folder
                      (config.json, model.safetensors, tokenizer files), for fully offline use

A folder is found locally (a path: never any network) or on the Hugging Face Hub by repo id (clip.hub.snapshot, through
huggingface_hub's cache, honouring HF_HUB_OFFLINE). Nothing here imports `mcpf_jax.train`.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

FORMAT = "mcpf_jax.pretrained"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
BACKBONE_DIR = "clip"


def write_params(path: pathlib.Path, flat: Mapping[str, Any]) -> None:
  """{"path/to/leaf": array} -> a safetensors file (float32 as trained; C-contiguous copies)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  tensors = {k: np.ascontiguousarray(np.asarray(v)) for k, v in sorted(flat.items())}
  save_file(tensors, str(path), metadata={"format": "np", "producer": FORMAT})


def read_params(path: pathlib.Path) -> dict[str, np.ndarray]:
  """The model's own parameters, {"path/to/leaf": array}."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  if not path.is_file():
    raise FileNotFoundError(f"{path}: not found; an exported model folder holds its parameters in {WEIGHTS_FILE}")
  return load_file(str(path))


_REQUIRED = {"format": str, "format_version": int, "model": dict, "seed": int, "clip": dict, "backbone": dict,
             "preprocessing": dict, "score": dict}


def read_config(folder: pathlib.Path) -> dict[str, Any]:
  """config.json of an exported folder, checked field by field (the error names the file and the field)."""
  path = folder / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{folder}: no {CONFIG_FILE}; not an exported mcpf_jax model (python -m mcpf_jax.export "
                            "writes one)")
  try:
    config = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e
  if config.get("format") != FORMAT:
    raise ValueError(f"{path}: 'format' is {config.get('format')!r}, expected {FORMAT!r} (an exported mcpf_jax model)")
  for key, kind in _REQUIRED.items():
    if not isinstance(config.get(key), kind):
      raise ValueError(f"{path}: field {key!r} is {config.get(key)!r}, expected a {kind.__name__}")
  if config["format_version"] > FORMAT_VERSION:
    raise ValueError(f"{path}: format_version {config['format_version']} is newer than this mcpf_jax reads "
                     f"({FORMAT_VERSION}); upgrade mcpf_jax")
  for section, keys in (("preprocessing", ("resize", "image_size", "num_crops")),
                        ("score", ("low", "high", "higher_is_better", "train_low01", "train_high01", "num_levels")),
                        ("backbone", ("fingerprint",))):
    for key in keys:
      if key not in config[section]:
        raise ValueError(f"{path}: field {section}.{key} is missing")
  return config


def is_local(name_or_path: str | os.PathLike[str]) -> bool:
  return pathlib.Path(name_or_path).expanduser().is_dir()
