"""SPAQ: 11125 smartphone photos (several megapixels each), MOS 0-100, split by image, with SPAQ's scene labels.

`python train.py --config configs/spaq.py --workdir runs/spaq` (the dataset prepared first with
`python -m mcpf_jax.data.prepare spaq --manual_dir <release folder> --data_dir ~/tensorflow_datasets`, or
set data.manual_dir to build it on first use).
"""

from configs import base


def get_config():
  c = base.get_config()
  c.data.name = "spaq"
  # Photos of several megapixels, resized so the short side is 512 (the usual practice for SPAQ) before cropping.
  # Decoding them is the input pipeline's bottleneck: raise data.num_workers where there are cores to spare.
  c.data.resize = 512
  return c
