"""KonIQ-10k: configs/base.py's defaults with DATASETS["koniq10k"], where its notes are.

`python train.py --config configs/koniq10k.py --workdir runs/koniq10k`, the same as `--config configs/base.py:koniq10k`.
"""

from configs import base


def get_config():
  return base.get_config("koniq10k")
