"""Bad input while building a dataset: errors that name the dataset, the file and the row, or a written skip report.

By default the first bad row raises `DatasetError`. With `skip_bad=True` each bad row is skipped and recorded; the
builder writes the records as JSON (and into the dataset's metadata), so nothing is ever dropped silently.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

# Kinds of bad rows (the `kind` field of a skip-report entry).
NO_IMAGE_NAME = "label_row_without_image_name"   # a label row whose image-name field is empty
MISSING_IMAGE = "missing_image"                  # a label row naming a file that does not exist
UNLABELLED_IMAGE = "image_without_label_row"     # an image file in the dataset's folders that no label row names
UNDECODABLE = "undecodable_image"                # the file exists but does not decode as an image
NAN_MOS = "nan_mos"                              # the score is NaN, empty or not a number
DUPLICATE = "duplicate_label_row"                # two label rows name the same image

KINDS = (NO_IMAGE_NAME, MISSING_IMAGE, UNLABELLED_IMAGE, UNDECODABLE, NAN_MOS, DUPLICATE)


class DatasetError(ValueError):
  """A dataset folder or label file that cannot be built as it is.

  Attributes:
    dataset: dataset name (e.g. "livec").
    file: the file (or folder) at fault.
    row: where in that file (e.g. "line 12", "entry 8", "row 5"), or None.
    detail: what was expected and what was found.
  """

  def __init__(self, dataset: str, file: str, row: str | None, detail: str):
    self.dataset, self.file, self.row, self.detail = dataset, file, row, detail
    where = f"{file}, {row}" if row else file
    super().__init__(f"dataset {dataset or '?'}: {where}: {detail}")


@dataclasses.dataclass(frozen=True)
class Problem:
  """One bad row or file.

  Attributes:
    kind: one of KINDS.
    file: the label file of the row, or the image file for unlabelled images.
    row: position in that file ("line 12", "entry 8"), or None.
    name: the image's relative path as named by the label row (or found on disk).
    detail: human-readable explanation.
  """
  kind: str
  file: str
  row: str | None
  name: str
  detail: str


class ProblemLog:
  """Raises on the first problem, or (skip_bad) collects them for the report."""

  def __init__(self, dataset: str, skip_bad: bool):
    self.dataset = dataset
    self.skip_bad = skip_bad
    self.problems: list[Problem] = []

  def add(self, kind: str, file: str, row: str | None, name: str, detail: str) -> None:
    if kind not in KINDS:
      raise ValueError(f"unknown problem kind {kind!r}")
    if not self.skip_bad:
      raise DatasetError(self.dataset, file, row, f"{detail} (pass skip_bad=True / --skip_bad to skip bad rows with "
                         "a written report)")
    self.problems.append(Problem(kind, file, row, name, detail))

  def as_json(self) -> list[dict[str, Any]]:
    return [dataclasses.asdict(p) for p in self.problems]


def write_report(path: pathlib.Path, dataset: str, manual_dir: str, log: ProblemLog, num_examples: int) -> None:
  """Writes the skip report: what was skipped, why, and where it came from."""
  path.parent.mkdir(parents=True, exist_ok=True)
  counts = {k: sum(p.kind == k for p in log.problems) for k in KINDS}
  report = {"dataset": dataset, "manual_dir": manual_dir, "num_examples": num_examples,
            "skipped": len(log.problems), "counts": counts, "problems": log.as_json()}
  path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
