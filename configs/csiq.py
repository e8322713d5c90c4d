"""CSIQ: 866 distorted images of 30 references (512x512), DMOS 0-1 (lower is better), split by reference.

`python train.py --config configs/csiq.py --workdir runs/csiq` (the dataset prepared first with
`python -m mcpf_jax.data.prepare csiq --manual_dir <release folder> --data_dir ~/tensorflow_datasets`, or
set data.manual_dir to build it on first use).
"""

from configs import base


def get_config():
  c = base.get_config()
  c.data.name = "csiq"
  c.data.resize = 512  # native 512x512
  return c
