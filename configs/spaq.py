"""SPAQ: configs/base.py's defaults with DATASETS["spaq"], where its notes are.

`python train.py --config configs/spaq.py --workdir runs/spaq`, the same as `--config configs/base.py:spaq`.
"""

from configs import base


def get_config():
  return base.get_config("spaq")
