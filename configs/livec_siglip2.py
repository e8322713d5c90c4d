"""LIVE In the Wild Challenge (CLIVE) on SigLIP 2 B/16 at 224 (fixed resolution), MCPF's prompts, fusion and heads.

`python train.py --config configs/livec_siglip2.py --workdir runs/livec_siglip2` (the weights from the Hugging Face
Hub, or `--config.clip.name=/path/to/google/siglip2-base-patch16-224` for a local copy, offline). Any fixed-resolution
SigLIP 2 checkpoint fits (`google/siglip2-large-patch16-256`, `google/siglip2-so400m-patch14-384`, ...: the crop size
follows the checkpoint's image_size); the NaFlex variants are not supported. The other datasets on SigLIP 2:
configs/siglip2.py:<dataset>. How SigLIP's pooling and sigmoid logits are read: mcpf_jax/model/iqa.py
(`model.class_probs`, `model.pool_visual_prompts`).
"""

from configs import siglip2


def get_config():
  return siglip2.get_config("livec")
