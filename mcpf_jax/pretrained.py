"""The exported model folder (`python -m mcpf_jax.export`): what a user needs to score images, and nothing else.

  config.json         format, the model config, the preprocessing (resize, crop size, crops), the score mapping
                      (scale, range, direction), the backbone reference (below), the training run's identity
                      (dataset, split protocol, step, metrics)
  model.safetensors   the model's own parameters (prompts, fusion, heads: every leaf outside the CLIP backbone,
                      and any trained backbone leaf), float32, keys "fusion/layer_0/text_in/kernel"; no optimizer
  README.md           the model card (Hugging Face format: YAML metadata + text)
  clip/               only with --include_backbone: the CLIP backbone as a Hugging Face CLIP folder
                      (config.json, model.safetensors, tokenizer files), for fully offline use

The backbone reference `backbone` names no path of the machine that exported it (the folder may be published):
{"hub_id", "revision" (the exact commit), "weights" (its file name), "fingerprint" (a hash of the parameter values,
checked on load), "included", "path"}; "path" is the included backbone's folder relative to the exported one
("clip"), null when it is not included. A backbone without a hub id (a local CLIP, the smoke run's tiny CLIP) is
named by its fingerprint alone. Folders written before "path" was recorded carry the exporting machine's path in
"source" (never read) and their backbone, if included, in clip/: they load as before.

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

from mcpf_jax import rundir

FORMAT = "mcpf_jax.pretrained"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
BACKBONE_DIR = "clip"


def params_bytes(flat: Mapping[str, Any]) -> bytes:
  """{"path/to/leaf": array} -> the safetensors file's bytes (float32 as trained; C-contiguous copies)."""
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
  tensors = {k: np.ascontiguousarray(np.asarray(v)) for k, v in sorted(flat.items())}
  return save(tensors, metadata={"format": "np", "producer": FORMAT})


def write_params(path: pathlib.Path, flat: Mapping[str, Any]) -> None:
  """{"path/to/leaf": array} -> a safetensors file, with the ordinary file mode (safetensors' save_file makes
  it 0600)."""
  path.write_bytes(params_bytes(flat))


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


class MissingBackbone(FileNotFoundError):
  """The backbone of an exported model is neither in its folder nor where its reference points: a usage error (the
  message names the fingerprint and the command that gives the backbone; score.py exits 2 on it)."""


def included_backbone(folder: pathlib.Path, config: dict[str, Any]) -> pathlib.Path | None:
  """The folder of the backbone included in an exported folder (`backbone.path`, relative to it), or None.

  Raises:
    ValueError: `backbone.path` is not a folder name inside the exported folder.
    FileNotFoundError: it names a folder that is not there (an incomplete copy).
  """
  where = folder / CONFIG_FILE
  rel = config["backbone"].get("path")
  if rel is None:  # not included, or a folder written before "path" was recorded: clip/ if it is there
    return folder / BACKBONE_DIR if (folder / BACKBONE_DIR).is_dir() else None
  parts = pathlib.PurePosixPath(rel).parts if isinstance(rel, str) else ()
  if not parts or pathlib.PurePosixPath(rel).is_absolute() or "\\" in rel or any(p in (".", "..") for p in parts):
    raise ValueError(f"{where}: field backbone.path is {rel!r}, expected a folder inside the exported folder, "
                     f"relative to it (e.g. {BACKBONE_DIR!r})")
  path = folder.joinpath(*parts)
  if not path.is_dir():
    raise FileNotFoundError(f"{where}: backbone.path is {rel!r}, but {path} is not a folder: the exported folder is "
                            "incomplete (copy all of it, or export it again)")
  return path


def missing_backbone(name_or_path: str | os.PathLike[str], config: dict[str, Any], why: str) -> MissingBackbone:
  """The error for a backbone that cannot be found, with the one command that gives it."""
  backbone = config["backbone"]
  hub_id, revision = backbone.get("hub_id"), backbone.get("revision")
  if hub_id:
    what = f"{hub_id!r}{f' (revision {revision})' if revision else ''}"
  elif config.get("clip", {}).get("name"):  # a name that is neither a hub id nor a local folder: generated by the run
    name = config["clip"]["name"]
    folder = rundir.GENERATED_CLIP.format(name=name)
    what = f"(the run's generated backbone {name!r}: the {folder}/ folder of its workdir)"
  else:
    what = "(a local CLIP folder; it has no hub id)"
  return MissingBackbone(
      f"{name_or_path}: the model needs the CLIP backbone {what} with fingerprint {backbone['fingerprint']}: {why}. "
      f"Give its folder: python score.py --pretrained {name_or_path} --clip CLIP_FOLDER (clip_name= in "
      "Scorer.from_pretrained; its fingerprint is checked), or export the model again with --include_backbone")


def is_local(name_or_path: str | os.PathLike[str]) -> bool:
  return pathlib.Path(name_or_path).expanduser().is_dir()
