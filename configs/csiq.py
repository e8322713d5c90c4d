"""CSIQ: configs/base.py's defaults with DATASETS["csiq"], where its notes are.

`python train.py --config configs/csiq.py --workdir runs/csiq`, the same as `--config configs/base.py:csiq`.
"""

from configs import base


def get_config():
  return base.get_config("csiq")
