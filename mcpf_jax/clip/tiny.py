"""A tiny random CLIP written in the real Hugging Face format, for the smoke run, tests and offline demos.

No machine of this project can download weights, so the smoke config builds one of these: config.json +
model.safetensors (PyTorch key names and layouts, loadable by transformers' CLIPModel) + the real CLIP tokenizer
files (the 49,408-token vocabulary shipped in mcpf_jax/clip/assets).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import numpy as np

from mcpf_jax.clip.checkpoint import save_pretrained
from mcpf_jax.clip.config import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from mcpf_jax.clip.model import init_random


def tiny_config(*, width: int = 64, layers: int = 4, heads: int = 4, image_size: int = 64, patch_size: int = 8,
                embed_dim: int = 64, hidden_act: str = "quick_gelu", **changes: Any) -> CLIPConfig:
  """Both towers `layers` deep and `width` wide; OpenAI's vocabulary and 77-token context."""
  text = CLIPTextConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                        num_attention_heads=heads, hidden_act=hidden_act)
  vision = CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                            num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
                            hidden_act=hidden_act)
  return CLIPConfig(text=text, vision=vision, projection_dim=embed_dim, **changes)


def perturbed_params(config: CLIPConfig, seed: int = 0, scale: float = 0.1) -> dict[str, Any]:
  """Random parameters where every leaf (LayerNorm scales and biases too) is perturbed, so every block matters.

  logit_scale is set to log(100), as in trained CLIPs, so the softmax over classes is not flat.
  """
  params = init_random(config, seed)
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  out = [np.asarray(x, np.float32) + scale * rng.standard_normal(np.shape(x)).astype(np.float32) for x in leaves]
  params = jax.tree.unflatten(treedef, out)
  params["logit_scale"] = np.asarray(np.log(100.0), np.float32)
  return params


def write_tiny_clip(folder: str | os.PathLike[str], *, seed: int = 0, **config_changes: Any) -> pathlib.Path:
  """Writes a tiny random CLIP folder (HF format, with tokenizer files) and returns its path.

  Idempotent: an existing folder with the same config.json is left as it is (the same seed gives the same
  weights), so concurrent runs and resumed runs agree on the backbone.
  """
  folder = pathlib.Path(folder)
  config = tiny_config(**config_changes)
  if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
    import json  # pylint: disable=g-import-not-at-top
    if json.loads((folder / "config.json").read_text()) == json.loads(json.dumps(config.to_hf())):
      return folder
  return save_pretrained(folder, perturbed_params(config, seed), config, tokenizer_files=True)
