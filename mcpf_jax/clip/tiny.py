"""A tiny random CLIP written in the real Hugging Face format, for the smoke run, tests and offline demos.

No machine of this project can download weights, so the smoke config builds one of these: config.json +
model.safetensors (PyTorch key names and layouts, loadable by transformers' CLIPModel) + the real CLIP tokenizer
files (the 49,408-token vocabulary shipped in mcpf_jax/clip/assets).

A vision tower from a file can replace the random one (`vision_weights=`): the smoke run's pre-trained tower is
one (mcpf_jax.smoke.backbone).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import pathlib
from typing import Any

import jax
import numpy as np
import scipy.ndimage

from mcpf_jax.clip.checkpoint import read_safetensors, save_pretrained
from mcpf_jax.clip.config import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from mcpf_jax.clip.init import init_random


def tiny_config(*, width: int = 64, layers: int = 4, heads: int = 4, image_size: int = 64, patch_size: int = 8,
                embed_dim: int = 64, hidden_act: str = "quick_gelu", **changes: Any) -> CLIPConfig:
  """Both towers `layers` deep and `width` wide; OpenAI's vocabulary and 77-token context."""
  text = CLIPTextConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                        num_attention_heads=heads, hidden_act=hidden_act)
  vision = CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                            num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
                            hidden_act=hidden_act)
  return CLIPConfig(text=text, vision=vision, projection_dim=embed_dim, **changes)


VISION_TOWER = ("vision_model", "visual_projection")  # the top-level parameter groups a vision-tower file holds


def perturbed_params(config: CLIPConfig, seed: int = 0, scale: float = 0.1, *, logit_scale: float = 100.0,
                     highpass_patches: bool = False) -> dict[str, Any]:
  """Random parameters where every leaf (LayerNorm scales and biases too) is perturbed, so every block matters.

  Args:
    config: the CLIP's configuration.
    seed: everything is drawn from it.
    scale: std of the normal noise added to every leaf.
    logit_scale: exp of the stored log temperature (CLIP's trained value is 100).
    highpass_patches: make every patch-embedding filter a zero-mean, high-pass random filter (random 2-D noise
      minus its Gaussian blur at sigma 0.5, 1 or 2 px; norm 3). A purely random backbone's features barely
      reflect image sharpness or noise, so no prompt can rank distortion levels on unseen photos; these filters
      lift a linear probe on its image features part of the way (BENCHMARKS.md, "The smoke run's tiny CLIP").
      The smoke config uses the pre-trained tower of `mcpf_jax.smoke.pretrain` instead.
  """
  params = init_random(config, seed)
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  out = [np.asarray(x, np.float32) + scale * rng.standard_normal(np.shape(x)).astype(np.float32) for x in leaves]
  params = jax.tree.unflatten(treedef, out)
  params["logit_scale"] = np.asarray(np.log(logit_scale), np.float32)
  if highpass_patches:
    emb = params["vision_model"]["embeddings"]["patch_embedding"]
    kh, kw, cin, cout = emb["kernel"].shape
    kernel = np.empty((kh, kw, cin, cout), np.float32)
    for c in range(cout):
      for i in range(cin):
        f = rng.standard_normal((kh, kw))
        kernel[:, :, i, c] = f - scipy.ndimage.gaussian_filter(f, (0.5, 1.0, 2.0)[c % 3], mode="wrap")
    emb["kernel"] = 3.0 * kernel / np.sqrt(np.sum(kernel ** 2, axis=(0, 1, 2), keepdims=True))
  return params


def load_vision_tower(path: str | os.PathLike[str], config: CLIPConfig) -> dict[str, Any]:
  """A vision-tower file (`smoke.pretrain.save_tower`) -> {vision_model: ..., visual_projection: ...} for `config`.

  Raises:
    FileNotFoundError: no such file.
    ValueError: a tensor is missing, unknown or of another shape than `config` needs (names the file and tensor).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such vision-tower file (expected a safetensors file of "
                            "mcpf_jax.smoke.pretrain.save_tower)")
  return read_safetensors(path, config, groups=VISION_TOWER)


def file_sha256(path: str | os.PathLike[str]) -> str:
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def write_tiny_clip(folder: str | os.PathLike[str], *, seed: int = 0, logit_scale: float = 100.0,
                    highpass_patches: bool = False, vision_weights: str | os.PathLike[str] | None = None,
                    vision_weights_name: str | None = None,
                    **config_changes: Any) -> pathlib.Path:
  """Writes a tiny random CLIP folder (HF format, with tokenizer files) and returns its path.

  `logit_scale` and `highpass_patches` as in `perturbed_params`; `vision_weights`: None (all random) or the path
  of a vision-tower safetensors file (`load_vision_tower`), which replaces the vision tower and visual projection
  (the text tower and logit scale stay random); `vision_weights_name` is what the recipe records for it (default:
  the path as given). The rest changes `tiny_config`.

  Idempotent: a folder already written with the same recipe (mcpf_tiny.json: seed, options, config) is left as
  it is, so resumed runs and later eval/score runs read the same backbone.
  """
  folder = pathlib.Path(folder)
  config = tiny_config(**config_changes)
  recipe = {"seed": seed, "logit_scale": logit_scale, "highpass_patches": highpass_patches, "config": config.to_hf()}
  if vision_weights is not None:
    tower_file = pathlib.Path(vision_weights).expanduser()
    if not tower_file.is_file():
      raise FileNotFoundError(f"{tower_file}: no such vision-tower file (vision_weights: a safetensors file of "
                              "mcpf_jax.smoke.pretrain.save_tower)")
    name = str(vision_weights) if vision_weights_name is None else vision_weights_name
    recipe["vision_weights"] = {"name": name, "sha256": file_sha256(tower_file)}
  marker = folder / "mcpf_tiny.json"
  if (marker.exists() and (folder / "model.safetensors").exists()
      and json.loads(marker.read_text()) == json.loads(json.dumps(recipe))):
    return folder
  params = perturbed_params(config, seed, logit_scale=logit_scale, highpass_patches=highpass_patches)
  if vision_weights is not None:
    params.update(load_vision_tower(tower_file, config))
  save_pretrained(folder, params, config, tokenizer_files=True)
  marker.write_text(json.dumps(recipe, indent=2) + "\n")  # written last: a complete folder
  return folder


def config_of(options: dict[str, Any]) -> CLIPConfig:
  """The CLIPConfig `write_tiny_clip(folder, **options)` writes, without writing anything: the options that pick
  the weights (its keyword-only parameters) are dropped, the rest go to `tiny_config`."""
  weights = {n for n, p in inspect.signature(write_tiny_clip).parameters.items() if p.kind == p.KEYWORD_ONLY}
  return tiny_config(**{k: v for k, v in dict(options).items() if k not in weights})
