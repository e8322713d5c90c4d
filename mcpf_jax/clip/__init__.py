"""CLIP towers, Hugging Face checkpoint loading, tokenizer and preprocessing. Knows nothing of IQA."""

from mcpf_jax.clip.checkpoint import Bundle, fingerprint, load, save_pretrained
from mcpf_jax.clip.config import PRESETS, CLIPConfig, CLIPTextConfig, CLIPVisionConfig, preset
from mcpf_jax.clip.model import CLIP, init_random

__all__ = [
  "CLIP",
  "PRESETS",
  "Bundle",
  "CLIPConfig",
  "CLIPTextConfig",
  "CLIPVisionConfig",
  "Tokenizer",
  "fingerprint",
  "init_random",
  "load",
  "preset",
  "save_pretrained",
]


def __getattr__(name: str):
  # The tokenizer is imported on first use, so the towers work without its dependencies being loaded.
  if name == "Tokenizer":
    from mcpf_jax.clip.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
    return Tokenizer
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
