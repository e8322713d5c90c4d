"""LIVE In the Wild Challenge (CLIVE): configs/base.py's defaults with DATASETS["livec"], where its notes are.

`python train.py --config configs/livec.py --workdir runs/livec`, the same as `--config configs/base.py:livec`.
"""

from configs import base


def get_config():
  return base.get_config("livec")
