"""AGIQA-3K: 2982 AI-generated images (sizes vary by generator), quality MOS, split by prompt so no prompt's
images are on both sides.

`python train.py --config configs/agiqa3k.py --workdir runs/agiqa3k` (the dataset prepared first with
`python -m mcpf_jax.data.prepare agiqa3k --manual_dir <release folder> --data_dir ~/tensorflow_datasets`, or
set data.manual_dir to build it on first use).
"""

from configs import base


def get_config():
  c = base.get_config()
  c.data.name = "agiqa3k"
  c.data.resize = 512  # generators' outputs are 512 px or larger: short side 512
  return c
