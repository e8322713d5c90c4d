"""AGIQA-3K: configs/base.py's defaults with DATASETS["agiqa3k"], where its notes are.

`python train.py --config configs/agiqa3k.py --workdir runs/agiqa3k`, the same as `--config configs/base.py:agiqa3k`.
"""

from configs import base


def get_config():
  return base.get_config("agiqa3k")
