"""LIVE IQA (release 2): configs/base.py's defaults with DATASETS["live"], where its notes are.

`python train.py --config configs/live.py --workdir runs/live`, the same as `--config configs/base.py:live`.
"""

from configs import base


def get_config():
  return base.get_config("live")
