"""IQA datasets: TFDS builders over the official releases, random-access sources, and content-based splits.

Build once (needs the extracted release; no TensorFlow):
  python -m mcpf_jax.data.prepare livec --manual_dir ~/data/ChallengeDB_release --data_dir ~/tfds
Read (no TensorFlow, random access; picklable for grain workers):
  src = mcpf_jax.data.source("livec", data_dir="~/tfds")
  rec = src[0]   # {"image": b"...", "name": "Images/...", "mos": float32, "content_id": ..., ...}
  train, test = mcpf_jax.data.splits.split_indices(src.content_ids, seed=0)

Files, one job each:
  registry.py    the dataset names (NAMES): the ten release layouts + "csv"; builders and prepare derive from it;
                 GENERATED: the datasets plugins write on first use (register_generated)
  readers.py     Row / Listing / Layout, the csv / xlsx / MATLAB readers, shared row checks, and TableLayout: the
                 one reader of table-shaped releases, declared as a `Table` (file, columns, folder)
  layouts.py     the ten benchmarks' release layouts (KADID-10k, AGIQA-1K, AGIQA-3K declared as tables)
  csv_layout.py  a user's images + csv; CsvSpec, the one definition of its options (CsvConfig, prepare's flags)
  collect.py     the checks every dataset shares (missing / unlabelled / undecodable images, duplicates) + LIQE
  liqe.py        LIQE's split files (scene and distortion labels); problems.py: DatasetError and skip reports
  builders.py    the TFDS builders (one per name), records and metadata; prepare.py the command line
  sources.py     random-access reading of built datasets; splits.py content-based splits; pipeline.py grain
"""

from mcpf_jax.data import splits
from mcpf_jax.data.builders import CsvConfig
from mcpf_jax.data.problems import DatasetError
from mcpf_jax.data.registry import CSV, GENERATED, NAMES, Generated, register_generated
from mcpf_jax.data.sources import IqaSource, builder, dataset_dir, info, source

__all__ = ["CSV", "GENERATED", "NAMES", "CsvConfig", "DatasetError", "Generated", "IqaSource", "builder",
           "dataset_dir", "info", "register_generated", "source", "splits"]
