"""A user's own dataset: a folder of images and a csv naming them, with the columns given by a `CsvSpec`.

`CsvSpec` is the one definition of the csv dataset's options, each field with its doc: the TFDS config
(builders.CsvConfig) is made from its fields, and so are the flags of `python -m mcpf_jax.data.prepare csv`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from typing import Any

from mcpf_jax.data.readers import Layout, Listing, checked_row, join, read_csv, to_float


def _field(default: Any, doc: str, **flag: Any) -> Any:
  """A CsvSpec field with its doc (and, in `flag`, how prepare's flag differs: its name, inverted, its doc)."""
  return dataclasses.field(default=default, metadata={"doc": doc, **flag})


@dataclasses.dataclass
class CsvSpec:
  """How to read a user's csv of image paths and scores (each field's doc is in its metadata["doc"]).

  Attributes:
  """
  csv_path: str = dataclasses.field(metadata={"doc": "the csv file (absolute, or relative to the image folder = "
                                                     "manual_dir)"})
  image_column: str = _field("image", "column with the image path, relative to image_root")
  mos_column: str = _field("mos", "column with the score")
  std_column: str | None = _field(None, "optional column with the score's standard deviation")
  content_column: str | None = _field(None, "optional column with the content id (default: the image path "
                                            "itself, as for authentic images)")
  split_column: str | None = _field(None, "optional column with an official split name per row")
  delimiter: str = _field(",", "csv delimiter")
  image_root: str = _field("", "folder of the images, relative to manual_dir ('' = manual_dir itself)")
  higher_is_better: bool = _field(True, "whether a higher score is better (False for DMOS-like scores)",
                                  flag="lower_is_better", inverted=True,
                                  flag_doc="the score is DMOS-like: lower is better (higher_is_better=False)")
  mos_range: tuple[float, float] | None = _field(None, "nominal score range (lo, hi), or None: the observed range "
                                                       "is recorded")
  liqe_folder: str | None = _field(None, "the dataset's folder under liqe_dir (to join LIQE's scene and distortion "
                                         "labels), if any")


CsvSpec.__doc__ += "".join(f"    {f.name}: {f.metadata['doc']}.\n" for f in dataclasses.fields(CsvSpec))
# Build options rather than how the csv reads: not part of the layout's notes (the metadata's liqe block has them).
_NOT_IN_NOTES = ("liqe_folder",)


class CsvLayout(Layout):
  """A user's folder of images and a csv naming them (configurable columns and delimiter)."""
  name = "csv"
  title = "images listed in a csv file"
  expected = "the image files named by the csv's image column"

  def __init__(self, spec: CsvSpec):
    self.spec = spec
    self.higher_is_better = spec.higher_is_better
    self.mos_kind = "MOS" if spec.higher_is_better else "DMOS"
    self.mos_range = tuple(spec.mos_range) if spec.mos_range else None
    self.content_kind = "custom" if spec.content_column else "image"

  def looks_like(self, root):
    return self._csv(root).exists()

  def _csv(self, root: pathlib.Path) -> pathlib.Path:
    p = pathlib.Path(os.path.expanduser(self.spec.csv_path))
    return p if p.is_absolute() else root / p

  def read(self, root, log):
    s = self.spec
    path = self._csv(root)
    if not path.exists():
      raise self.error(path, None, f"csv file not found (csv_path={s.csv_path!r}, image folder {root})")
    required = [c for c in (s.image_column, s.mos_column, s.std_column, s.content_column, s.split_column) if c]
    table = read_csv(self, path, required, delimiter=s.delimiter)
    label_file = os.path.relpath(path, root) if path.is_relative_to(root) else str(path)
    rows, dirs = [], set()
    for line, r in table:
      rel = r[s.image_column].strip().replace("\\", "/")
      name = join(s.image_root.strip("/"), rel) if rel else ""
      if name:
        dirs.add(name.rsplit("/", 1)[0] if "/" in name else "")
      row = checked_row(self, log, name=name, mos=to_float(r[s.mos_column]),
                        mos_std=to_float(r[s.std_column]) if s.std_column else math.nan,
                        content_id=r[s.content_column].strip() if s.content_column else name, file=label_file,
                        row=f"line {line}", official_split=r[s.split_column].strip() if s.split_column else "")
      if row:
        rows.append(row)
    notes = {"csv": {k: v for k, v in dataclasses.asdict(s).items() if k not in _NOT_IN_NOTES}}
    # Only the folders that hold labelled images are checked for unlabelled ones (a user's folder may hold more).
    return Listing(rows, [label_file], [(d, False) for d in sorted(dirs)], notes=notes)
