"""IQA datasets: TFDS builders over the official releases, random-access sources, and content-based splits.

Build once (needs the extracted release; no TensorFlow):
  python -m mcpf_jax.data.prepare livec --manual_dir ~/data/ChallengeDB_release --data_dir ~/tfds
Read (no TensorFlow, random access; picklable for grain workers):
  src = mcpf_jax.data.source("livec", data_dir="~/tfds")
  rec = src[0]   # {"image": b"...", "name": "Images/...", "mos": float32, "content_id": ..., ...}
  train, test = mcpf_jax.data.splits.split_indices(src.content_ids, seed=0)
"""

from mcpf_jax.data import splits
from mcpf_jax.data.builders import CsvConfig
from mcpf_jax.data.problems import DatasetError
from mcpf_jax.data.sources import IqaSource, builder, dataset_dir, info, source

NAMES = ("livec", "koniq10k", "spaq", "live", "csiq", "tid2013", "kadid10k", "agiqa1k", "agiqa3k", "aigciqa2023", "csv")

__all__ = ["NAMES", "CsvConfig", "DatasetError", "IqaSource", "builder", "dataset_dir", "info", "source", "splits"]
