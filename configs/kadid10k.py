"""KADID-10k: 10125 distorted images of 81 references (512x384), MOS 1-5, split by reference.

`python train.py --config configs/kadid10k.py --workdir runs/kadid10k` (the dataset prepared first with
`python -m mcpf_jax.data.prepare kadid10k --manual_dir <release folder> --data_dir ~/tensorflow_datasets`, or
set data.manual_dir to build it on first use).
"""

from configs import base


def get_config():
  c = base.get_config()
  c.data.name = "kadid10k"
  c.data.resize = 384  # native 512x384: no upscaling
  return c
