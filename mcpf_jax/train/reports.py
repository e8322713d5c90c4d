"""The files a run writes for people to read: per-image predictions (CSV) and the predicted-vs-MOS scatter plot.

Each is written whole (`rundir.write_atomic`), into a local run folder or a bucket.
"""

from __future__ import annotations

import csv
import io
import os

from mcpf_jax import rundir


def write_predictions(path: str | os.PathLike[str], rows: dict) -> None:
  """name, mos, score per image (rows: {"name", "mos", "score"} lists)."""
  f = io.StringIO(newline="")
  w = csv.writer(f)
  w.writerow(["name", "mos", "score"])
  for name, mos, score in zip(rows["name"], rows["mos"], rows["score"]):
    w.writerow([name, f"{mos:.6f}", f"{score:.6f}"])
  rundir.write_atomic(path, f.getvalue())


def scatter(path: str | os.PathLike[str], rows: dict, result: dict) -> None:
  """Predicted score against MOS, titled with the dataset, part and metrics of `result`."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
  ax.scatter(rows["score"], rows["mos"], s=10, alpha=0.7)
  ax.set_xlabel("predicted score (MOS scale)")
  ax.set_ylabel("MOS" if "higher" in result["label_direction"] else "DMOS")
  ax.set_title(f"{result['dataset']} ({result['part']}): SRCC {result['srcc']:.3f}, PLCC {result['plcc']:.3f}, "
               f"n={result['num_images']}", fontsize=9)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png")
  plt.close(fig)
  rundir.write_atomic(path, png.getvalue())
