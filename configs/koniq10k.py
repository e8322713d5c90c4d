"""KonIQ-10k: 10073 authentic photos (1024x768), MOS 0-100, split by image.

data.split_protocol: "seed" (default) is the papers' protocol, 80/20 random splits by content
(`--config.num_splits=10` for all ten); "official" is KonIQ's own training / validation / test split
(7058 / 1000 / 2015, the `set` column of koniq10k_distributions_sets.csv), e.g.
`--config.data.split_protocol=official`; its validation set picks the best checkpoint.

`python train.py --config configs/koniq10k.py --workdir runs/koniq10k` (the dataset prepared first with
`python -m mcpf_jax.data.prepare koniq10k --manual_dir <release folder> --data_dir ~/tensorflow_datasets`, or
set data.manual_dir to build it on first use).
"""

from configs import base


def get_config():
  c = base.get_config()
  c.data.name = "koniq10k"
  c.data.split_protocol = "seed"  # or "official" (see above)
  c.data.resize = 512  # 1024x768 -> 683x512; 384 matches the official 512x384 release instead
  return c
