"""TID2013: configs/base.py's defaults with DATASETS["tid2013"], where its notes are.

`python train.py --config configs/tid2013.py --workdir runs/tid2013`, the same as `--config configs/base.py:tid2013`.
"""

from configs import base


def get_config():
  return base.get_config("tid2013")
