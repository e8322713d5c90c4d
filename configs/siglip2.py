"""MCPF on SigLIP 2 B/16 at 224 (fixed resolution) for any dataset of configs/base.py's DATASETS table.

`python train.py --config configs/siglip2.py:koniq10k --workdir runs/koniq10k_siglip2` (no argument: livec, which
is configs/livec_siglip2.py). Another fixed-resolution SigLIP 2 checkpoint, or a local copy for offline runs, is
`--config.clip.name=...` (the crop size follows the checkpoint's image_size); the NaFlex variants are not supported.
How SigLIP's pooling and sigmoid logits are read: mcpf_jax/model/iqa.py (`model.class_probs`,
`model.pool_visual_prompts`).
"""

from configs import base

CLIP_NAME = "google/siglip2-base-patch16-224"


def get_config(dataset: str | None = None):
  c = base.get_config(dataset or "livec")
  c.clip.name = CLIP_NAME
  return c
