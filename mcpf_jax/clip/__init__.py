"""CLIP for prompt learning: the model, its Hugging Face checkpoints, tokenizer and preprocessing. Knows nothing of IQA.

  config.py      the configuration (Hugging Face config.json fields, presets, compute options)
  layers.py      the transformer layers both towers are built of (attention, MLP, block, f32-accumulating dense)
  model.py       the CLIP module: text and vision towers with prompt hooks, projections, logits
  siglip.py      SigLIP / SigLIP 2 (fixed resolution): MAP-pooled vision tower, last-token text head, logit bias
  openclip.py    OpenCLIP checkpoints (open_clip_config.json + weights) mapped onto the CLIP towers
  tuning.py      per-target speed choices (attention implementation, image-chunk size)
  init.py        parameter trees without a checkpoint (shapes, transformers' random initialisation)
  checkpoint.py  loading and saving the Hugging Face weight formats (CLIPModel and SiglipModel folders)
  hub.py         the one way to the Hugging Face Hub (snapshots in its cache, HF_HUB_OFFLINE honoured)
  tokenizer.py   the CLIP BPE tokenizer; siglip_tokenizer.py SigLIP 2's (Gemma's tokenizer.json, 64 ids)
  preprocess.py  the pixel normalisation; tiny.py tiny random CLIP folders
"""

from mcpf_jax.clip.checkpoint import Bundle, fingerprint, load, save_pretrained
from mcpf_jax.clip.config import PRESETS, CLIPConfig, CLIPTextConfig, CLIPVisionConfig, preset
from mcpf_jax.clip.init import init_random
from mcpf_jax.clip.model import CLIP

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
