"""Reading a release's label files: the `Row` / `Listing` / `Layout` types, the file readers, the shared checks.

A `Layout` (one per dataset, in layouts.py; the user's csv in csv_layout.py) knows which files its release holds
(to tell a wrong folder from a right one), parses the label files in their official formats and returns one `Row`
per labelled image, with the score exactly as the label file gives it (DMOS stays DMOS; the direction is metadata).
This module holds what every layout reads with: csv / xlsx / MATLAB readers whose errors name the file, row and
field, `checked_row` (an empty image name or a NaN score is a reported problem, not a row), and `TableLayout`, the
one reader of the table-shaped releases (one label file with name / score / std columns and an image folder), which
a layout declares as a `Table` instead of coding. Checks that are the same for every dataset (missing or unlabelled
images, decoding, duplicates, LIQE labels) live in `collect.py`.

Names (`Row.name`) are paths relative to the release folder with `/` separators, e.g. `Images/611.JPG`,
`1024x768/10004473376.jpg`, `jp2k/img55.bmp`: the same form as LIQE's split files.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from mcpf_jax.data import problems


@dataclasses.dataclass
class Row:
  """One labelled image as its label file gives it.

  Attributes:
    name: path relative to the release folder, `/`-separated.
    mos: the score as given (MOS or DMOS).
    mos_std: standard deviation of the score as given, NaN where the release has none.
    content_id: the image itself (authentic), its reference image (synthetic) or its prompt (AI-generated).
    file: label file the row comes from (relative to the release folder), for messages.
    row: position in that file ("line 3", "entry 8", "row 5").
    official_split: the release's own split name ("training", "validation", "test") or "".
    scene: the release's own scene labels as [9] bools over SCENES (SPAQ), or None.
  """
  name: str
  mos: float
  mos_std: float
  content_id: str
  file: str
  row: str
  official_split: str = ""
  scene: tuple[bool, ...] | None = None


@dataclasses.dataclass
class Listing:
  """What a layout read from a release folder.

  Attributes:
    rows: labelled images to build, in label-file order.
    label_files: label files used (relative paths).
    owned_dirs: (relative folder, recursive) pairs whose image files must all be named by a label row.
    not_rated: relative paths inside owned folders that are deliberately not examples (reference images and the
      reference copies of LIVE), so they do not count as unlabelled.
    excluded: labelled entries deliberately not built, reason -> count (CLIVE's t1..t7, LIVE's reference copies).
    notes: provenance (which label-file variant, which column is the score, ...), stored in the metadata.
  """
  rows: list[Row]
  label_files: list[str]
  owned_dirs: list[tuple[str, bool]]
  not_rated: set[str] = dataclasses.field(default_factory=set)
  excluded: dict[str, int] = dataclasses.field(default_factory=dict)
  notes: dict[str, Any] = dataclasses.field(default_factory=dict)


class Layout:
  """One dataset's release layout. Subclasses set the class attributes and implement `read`.

  Attributes:
    name: dataset name (the builder name and the folder under data_dir).
    title: human name.
    homepage: where the release is downloaded.
    mos_kind: "MOS" or "DMOS".
    higher_is_better: score direction (False for DMOS).
    mos_range: nominal scale of the score, or None where it is not documented (then the observed range is used).
    content_kind: what content_id holds: "image", "reference" or "prompt".
    official_splits: split names the release defines ("training", "validation", "test") or ().
    required: groups of relative paths; each group needs one existing member for the folder to be this release.
    expected: the same as text, for error messages.
  """
  name: str = ""
  title: str = ""
  homepage: str = ""
  mos_kind: str = "MOS"
  higher_is_better: bool = True
  mos_range: tuple[float, float] | None = None
  content_kind: str = "image"
  official_splits: tuple[str, ...] = ()
  required: tuple[tuple[str, ...], ...] = ()
  expected: str = ""

  def looks_like(self, root: pathlib.Path) -> bool:
    return bool(self.required) and all(any((root / p).exists() for p in group) for group in self.required)

  def read(self, root: pathlib.Path, log: problems.ProblemLog) -> Listing:
    raise NotImplementedError

  def error(self, file: str | os.PathLike[str], row: str | None, detail: str) -> problems.DatasetError:
    return problems.DatasetError(self.name, str(file), row, detail)


# ---------------------------------------------------------------------------------------------------------------
# File readers and shared checks.

def to_float(value: Any) -> float:
  """Parses a label-file cell; NaN for empty or non-numeric cells (the caller reports NaN scores)."""
  if value is None:
    return math.nan
  if isinstance(value, (int, float, np.integer, np.floating)):
    return float(value)
  text = str(value).strip()
  if not text:
    return math.nan
  try:
    return float(text)
  except ValueError:
    return math.nan


def first_existing(root: pathlib.Path, candidates: Sequence[str]) -> str | None:
  for c in candidates:
    if (root / c).exists():
      return c
  return None


def read_csv(layout: Layout, path: pathlib.Path, required: Sequence[str],
             delimiter: str = ",") -> list[tuple[int, dict[str, str]]]:
  """Reads a csv with a header into (line number, row dict) pairs; errors name missing columns."""
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.reader(f, delimiter=delimiter)
    try:
      header = [h.strip() for h in next(reader)]
    except StopIteration:
      raise layout.error(path, None, "the file is empty (expected a header line)") from None
    missing = [c for c in required if c not in header]
    if missing:
      raise layout.error(path, "line 1", f"missing column(s) {missing}; the header has {header}")
    out = []
    for values in reader:
      if not any(v.strip() for v in values):
        continue
      out.append((reader.line_num, dict(zip(header, values))))
  return out


def read_xlsx(layout: Layout, path: pathlib.Path, sheet: str | None = None) -> list[tuple[int, tuple[Any, ...]]]:
  """Reads the cell values of one sheet (the first by default) as (1-based row number, values) pairs."""
  import openpyxl  # pylint: disable=g-import-not-at-top  (only the xlsx releases need it)
  try:
    wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
  except Exception as e:  # openpyxl raises zipfile / KeyError / InvalidFileException for non-xlsx files
    raise layout.error(path, None, f"cannot be read as an .xlsx workbook: {e}") from e
  try:
    if sheet is not None and sheet not in wb.sheetnames:
      raise layout.error(path, None, f"has no sheet {sheet!r}; its sheets are {wb.sheetnames}")
    ws = wb[sheet] if sheet is not None else wb.worksheets[0]
    return [(i, tuple(r)) for i, r in enumerate(ws.iter_rows(values_only=True), start=1)]
  finally:
    wb.close()


def xlsx_table(layout: Layout, path: pathlib.Path, required: Sequence[str],
               sheet: str | None = None) -> list[tuple[int, dict[str, Any]]]:
  """Reads an xlsx sheet whose header row (the first row that holds all `required` names) may not be row 1."""
  rows = read_xlsx(layout, path, sheet)
  for k, (_, values) in enumerate(rows):
    header = [str(v).strip() if v is not None else "" for v in values]
    if all(c in header for c in required):
      out = []
      for row_no, vals in rows[k + 1:]:
        if all(v is None or str(v).strip() == "" for v in vals):
          continue
        out.append((row_no, dict(zip(header, vals))))
      return out
  first = rows[0][1] if rows else ()
  raise layout.error(path, None, f"no header row with the columns {list(required)} (first row: {first})")


def load_mat(layout: Layout, path: pathlib.Path) -> dict[str, Any]:
  import scipy.io  # pylint: disable=g-import-not-at-top
  try:
    return scipy.io.loadmat(path)
  except Exception as e:  # scipy raises ValueError / TypeError / MatReadError on non-MAT files
    raise layout.error(path, None, f"cannot be read as a MATLAB .mat file: {e}") from e


def mat_var(layout: Layout, path: pathlib.Path, mat: dict[str, Any], var: str) -> np.ndarray:
  if var not in mat:
    found = sorted(k for k in mat if not k.startswith("__"))
    raise layout.error(path, None, f"has no variable {var!r}; found {found}")
  return mat[var]


def mat_strings(layout: Layout, path: pathlib.Path, var: str) -> list[str]:
  """A MATLAB cell array of char rows (any orientation) as a list of str."""
  arr = mat_var(layout, path, load_mat(layout, path), var)
  out = []
  for cell in np.asarray(arr, dtype=object).ravel(order="F"):
    values = np.asarray(cell).ravel()
    out.append(str(values[0]).strip() if values.size else "")
  return out


def mat_numbers(layout: Layout, path: pathlib.Path, var: str, mat: dict[str, Any] | None = None) -> np.ndarray:
  """A MATLAB numeric vector (1xN or Nx1) as float64 [N]."""
  arr = np.asarray(mat_var(layout, path, mat if mat is not None else load_mat(layout, path), var))
  if arr.ndim > 2 or (arr.ndim == 2 and min(arr.shape) > 1):
    raise layout.error(path, None, f"variable {var!r} has shape {arr.shape}; expected a 1xN or Nx1 vector")
  return arr.astype(np.float64).ravel()


def image_name(value: Any) -> str:
  """A label-file cell holding an image name, as str ('' for empty cells)."""
  if value is None:
    return ""
  if isinstance(value, float) and value.is_integer():
    return str(int(value))
  return str(value).strip()


def checked_row(layout: Layout, log: problems.ProblemLog, *, name: str, mos: float, mos_std: float,
                content_id: str, file: str, row: str, official_split: str = "",
                scene: tuple[bool, ...] | None = None, mos_file: str | None = None) -> Row | None:
  """Builds a Row, reporting an empty image name or a NaN score (returns None when the row is skipped)."""
  base = name.rsplit("/", 1)[-1] if name else ""
  if not base:
    log.add(problems.NO_IMAGE_NAME, file, row, name, "label row without an image name")
    return None
  if not math.isfinite(mos):
    log.add(problems.NAN_MOS, mos_file or file, row, name, f"score of {name} is NaN, empty or not a number")
    return None
  return Row(name, mos, mos_std, content_id, file, row, official_split, scene)


def find_image_dir(layout: Layout, root: pathlib.Path, names: Sequence[str], candidates: Sequence[str],
                   label_file: str) -> str:
  """The candidate folder that holds the most of the first label-file names (AI-generated releases vary)."""
  probe = [n for n in names if n][:50]
  best, best_hits = None, 0
  for c in candidates:
    d = root / c
    if not d.is_dir():
      continue
    hits = sum((d / n).exists() for n in probe)
    if hits > best_hits:
      best, best_hits = c, hits
  if best is None:
    tried = ", ".join(f"{c}/" for c in candidates)
    raise layout.error(root, None, f"none of the folders {tried} holds the images named in {label_file} "
                       f"(e.g. {probe[:3]}); found {listing(root)}")
  return best


def listing(root: pathlib.Path, limit: int = 12) -> str:
  try:
    entries = sorted(os.listdir(root))
  except OSError as e:
    return f"<cannot list: {e}>"
  shown = [e + ("/" if (root / e).is_dir() else "") for e in entries[:limit]]
  more = f" and {len(entries) - limit} more" if len(entries) > limit else ""
  return "[" + ", ".join(shown) + "]" + more


def join(folder: str, name: str) -> str:
  return name if folder in ("", ".") else f"{folder}/{name}"


# ---------------------------------------------------------------------------------------------------------------
# Table-shaped releases: declared, read by one reader.


@dataclasses.dataclass(frozen=True)
class Table:
  """A table-shaped release: one label file, one row per image with name / score / std columns, an image folder.

  Attributes:
    file: the label file, relative to the release folder: a `.csv` with a header line, or an `.xlsx` (first sheet;
      the header row is the first row holding the columns, below any title rows).
    image: column with the image's file name, relative to the image folder.
    mos: column with the score, as given.
    std: column with the score's standard deviation (or variance: `std_is_variance`), or None (NaN).
    std_is_variance: the `std` column holds the variance; mos_std is its square root (NaN where negative).
    content: column with the content id (a reference image's name, a prompt), or None for the image itself.
    content_is_reference: the content column names reference images stored in the image folder: they are not
      examples, so not counted as unlabelled images.
    folders: the image folder; several candidates: the one holding the most of the first 50 named images (the
      releases of AI-generated images differ).
    header_has: a column the label file's first line must name for a folder to be this release (None: the file
      existing is enough); tells apart releases whose label files share a name.
    notes: provenance stored in the metadata (which column is the score, ...).
  """
  file: str
  image: str
  mos: str
  std: str | None = None
  std_is_variance: bool = False
  content: str | None = None
  content_is_reference: bool = False
  folders: tuple[str, ...] = (".",)
  header_has: str | None = None
  notes: Mapping[str, str] = dataclasses.field(default_factory=dict)

  @property
  def columns(self) -> tuple[str, ...]:
    """The columns the label file must have, in the order errors list them."""
    return tuple(c for c in (self.image, self.content, self.mos, self.std) if c)

  @property
  def required(self) -> tuple[tuple[str, ...], ...]:
    """The label file, and the image folder when there is one candidate (see Layout.required)."""
    return ((self.file,),) + (((self.folders[0],),) if len(self.folders) == 1 else ())


class TableLayout(Layout):
  """A layout declared by its `table` (plus the Layout attributes); `required` comes from the table."""
  table: ClassVar[Table]

  def __init_subclass__(cls, **kwargs: Any):
    super().__init_subclass__(**kwargs)
    cls.required = cls.table.required

  def looks_like(self, root: pathlib.Path) -> bool:
    if not super().looks_like(root):
      return False
    if self.table.header_has is None:
      return True
    with open(root / self.table.file, encoding="utf-8-sig") as f:
      return self.table.header_has in f.readline()

  def read(self, root: pathlib.Path, log: problems.ProblemLog) -> Listing:
    t = self.table
    if t.file.endswith(".xlsx"):
      table, where = xlsx_table(self, root / t.file, t.columns), "row"
    else:
      table, where = read_csv(self, root / t.file, t.columns), "line"
    if len(t.folders) == 1:
      folder, notes = t.folders[0], dict(t.notes)
    else:
      folder = find_image_dir(self, root, [image_name(r[t.image]) for _, r in table], t.folders, t.file)
      notes = {"image_dir": folder, **t.notes}
    rows, references = [], set()
    for k, r in table:
      n = image_name(r[t.image])
      content = str(r[t.content] or "").strip() if t.content else join(folder, n)
      if t.content_is_reference:
        references.add(join(folder, content))
      mos = to_float(r[t.mos])
      std = to_float(r[t.std]) if t.std else math.nan
      if t.std_is_variance:
        std = math.sqrt(std) if std >= 0 else math.nan
      row = checked_row(self, log, name=join(folder, n) if n else "", mos=mos, mos_std=std, content_id=content,
                        file=t.file, row=f"{where} {k}")
      if row:
        rows.append(row)
    return Listing(rows, [t.file], [(folder, False)], not_rated=references, notes=notes)
