"""KADID-10k: configs/base.py's defaults with DATASETS["kadid10k"], where its notes are.

`python train.py --config configs/kadid10k.py --workdir runs/kadid10k`, the same as `--config configs/base.py:kadid10k`.
"""

from configs import base


def get_config():
  return base.get_config("kadid10k")
