"""TID2013: 3000 distorted images of 25 references (512x384), MOS 0-9, split by reference.

`python train.py --config configs/tid2013.py --workdir runs/tid2013` (the dataset prepared first with
`python -m mcpf_jax.data.prepare tid2013 --manual_dir <release folder> --data_dir ~/tensorflow_datasets`, or
set data.manual_dir to build it on first use).
"""

from configs import base


def get_config():
  c = base.get_config()
  c.data.name = "tid2013"
  c.data.resize = 384  # native 512x384: no upscaling
  return c
