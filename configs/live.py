"""LIVE IQA (release 2): 779 distorted images of 29 references (mostly 768x512), DMOS (lower is better), split by
reference image so no content is on both sides.

`python train.py --config configs/live.py --workdir runs/live` (the dataset prepared first with
`python -m mcpf_jax.data.prepare live --manual_dir <release folder> --data_dir ~/tensorflow_datasets`, or
set data.manual_dir to build it on first use).
"""

from configs import base


def get_config():
  c = base.get_config()
  c.data.name = "live"
  c.data.resize = 512  # the short side of most LIVE images: native resolution
  return c
