"""LIVE In the Wild Challenge (CLIVE): 1162 authentic photos (500x500), MOS 0-100, split by image.

`python train.py --config configs/livec.py --workdir runs/livec` (the dataset prepared first with
`python -m mcpf_jax.data.prepare livec --manual_dir <release folder> --data_dir ~/tensorflow_datasets`, or
set data.manual_dir to build it on first use).
"""

from configs import base


def get_config():
  c = base.get_config()
  c.data.name = "livec"
  c.data.resize = 500  # the release's photos are 500x500: crops at native resolution, no resampling
  return c
