"""The files a run writes for people to read: per-image predictions (CSV) and the predicted-vs-MOS scatter plot."""

from __future__ import annotations

import csv
import pathlib


def write_predictions(path: pathlib.Path, rows: dict) -> None:
  """name, mos, score per image (rows: {"name", "mos", "score"} lists)."""
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["name", "mos", "score"])
    for name, mos, score in zip(rows["name"], rows["mos"], rows["score"]):
      w.writerow([name, f"{mos:.6f}", f"{score:.6f}"])


def scatter(path: pathlib.Path, rows: dict, result: dict) -> None:
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
  fig.savefig(path)
  plt.close(fig)
