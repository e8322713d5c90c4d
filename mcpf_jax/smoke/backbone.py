"""The smoke config's tiny CLIP: its sizes, its seed and its bundled pre-trained vision tower.

configs/smoke.py sets `clip.name = "tiny"`, `clip.tiny = dict(**SIZES, ..., vision_weights="smoke")` and
`clip.tiny_seed = SEED`; `recipe` reads them, `write` turns the recipe into a Hugging Face folder through
`mcpf_jax.clip.tiny.write_tiny_clip`, resolving a bundled tower's name (TOWERS) to its file (the generated backbone
"tiny" that mcpf_jax.smoke registers). The tower in assets/ is made for exactly these sizes
(`python -m mcpf_jax.smoke.pretrain` rebuilds it).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

from mcpf_jax.clip import tiny
from mcpf_jax.clip.config import CLIPConfig

SIZES = dict(width=64, layers=4, heads=4, image_size=64, patch_size=8, embed_dim=64)
SEED = 0
ASSETS = pathlib.Path(__file__).resolve().parent / "assets"
TOWERS = {"smoke": ASSETS / "tiny_smoke_vision.safetensors"}  # bundled vision towers by name


def config() -> CLIPConfig:
  return tiny.tiny_config(**SIZES)


def recipe(run_config) -> dict[str, Any]:
  """What the run's tiny CLIP is a function of: clip.tiny_seed and the clip.tiny options (`write`'s arguments)."""
  return {"seed": run_config.clip.tiny_seed, **run_config.clip.tiny}


def clip_config(options: dict[str, Any]) -> CLIPConfig:
  """The CLIPConfig `write(folder, **options)` writes, without writing anything."""
  return tiny.config_of(options)


def tower_path(vision_weights: str) -> pathlib.Path:
  """A bundled tower's name (TOWERS) or a file path -> the safetensors file."""
  if vision_weights in TOWERS:
    return TOWERS[vision_weights]
  return pathlib.Path(vision_weights).expanduser()


def write(folder: str | os.PathLike[str], *, vision_weights: str | None = None, **kwargs: Any) -> pathlib.Path:
  """`tiny.write_tiny_clip` with `vision_weights` either a bundled name ("smoke") or a file path."""
  if vision_weights is None:
    return tiny.write_tiny_clip(folder, **kwargs)
  return tiny.write_tiny_clip(folder, vision_weights=tower_path(vision_weights), vision_weights_name=vision_weights,
                              **kwargs)
