"""Turns a release folder into checked examples: the checks every dataset shares, then the LIQE labels.

Order: the folder must look like the release (else an error saying what was expected there); the layout reads the
label files; every image path they name must lie inside the folder (symlinks resolved; checked before any image is
opened, so a third party's label file cannot make the builder read, or an error message reveal, a file elsewhere;
`allow_outside_paths` lifts this, recorded in the metadata); then duplicates, missing images, images no label row
names (in the folders the release owns), undecodable images; then the LIQE scene/distortion labels are joined by
relative path. Every bad row raises `problems.DatasetError` naming the dataset, the file and the row, or
(skip_bad) is skipped and recorded.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import os
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np

from mcpf_jax import classes, images
from mcpf_jax.data import liqe, problems, readers, registry

DECODE_CHECKS = ("full", "verify", "none")


@dataclasses.dataclass
class Example:
  """One checked image, ready to be written (see builders.FEATURES for the stored record)."""
  path: pathlib.Path
  name: str
  mos: float
  mos_std: float
  content_id: str
  official_split: str
  scene: tuple[bool, ...]
  has_scene: bool
  distortion: int
  distortion_fine: int
  has_distortion: bool


@dataclasses.dataclass
class Collected:
  examples: list[Example]
  log: problems.ProblemLog
  metadata: dict[str, Any]


def _decoder() -> Callable[[bytes, str], Any]:
  """The project's image decoder where it exists (mcpf_jax.images.decode), else a full PIL decode."""
  try:
    from mcpf_jax import images  # pylint: disable=g-import-not-at-top
    return images.decode
  except (ImportError, AttributeError):
    return _pil_decode


def _pil_decode(data: bytes, name: str) -> None:
  del name
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(data)) as img:
    img.load()


def _pil_verify(data: bytes, name: str) -> None:
  del name
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(data)) as img:
    img.verify()


def decode_error(path: pathlib.Path, name: str, mode: str) -> str | None:
  """None if the file decodes (mode "full") or parses (mode "verify"), else why not."""
  if mode == "none":
    return None
  check = _decoder() if mode == "full" else _pil_verify
  try:
    data = path.read_bytes()
    if not data:
      return "the file is empty"
    check(data, name)
  except Exception as e:  # any decoder failure (PIL raises OSError, SyntaxError, ValueError, ...) means undecodable
    return f"{type(e).__name__}: {e}"
  return None


def sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


class _CaseIndex:
  """Case-insensitive lookup of file names per folder (release archives differ in case, e.g. TID2013's .BMP)."""

  def __init__(self, root: pathlib.Path):
    self.root = root
    self._dirs: dict[str, dict[str, list[str]]] = {}

  def resolve(self, name: str) -> str | None:
    if (self.root / name).is_file():
      return name
    folder, _, base = name.rpartition("/")
    if folder not in self._dirs:
      try:
        entries = os.listdir(self.root / folder) if folder else os.listdir(self.root)
      except OSError:
        entries = []
      table: dict[str, list[str]] = {}
      for e in entries:
        table.setdefault(e.lower(), []).append(e)
      self._dirs[folder] = table
    matches = self._dirs[folder].get(base.lower(), [])
    if len(matches) == 1 and (self.root / folder / matches[0]).is_file():
      return readers.join(folder, matches[0])
    return None


def check_root(layout: readers.Layout, root: pathlib.Path) -> None:
  if not root.is_dir() or not layout.looks_like(root):
    raise registry.wrong_folder_error(layout, root)


def image_files(root: pathlib.Path, folder: str, recursive: bool) -> list[str]:
  """Relative paths of the image files (by suffix) in one folder of the release."""
  base = root / folder if folder else root
  out = []
  if recursive:
    for dirpath, dirnames, filenames in os.walk(base):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
      rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
      out += [readers.join(rel, f) for f in sorted(filenames) if _is_image(f)]
  else:
    out = [readers.join(folder, e.name) for e in sorted(os.scandir(base), key=lambda e: e.name)
           if e.is_file() and _is_image(e.name)]
  return out


def _is_image(filename: str) -> bool:
  return not filename.startswith(".") and os.path.splitext(filename)[1].lower() in images.IMAGE_EXTENSIONS


def outside_paths(root: pathlib.Path, rows: list[readers.Row]) -> list[tuple[readers.Row, str]]:
  """The rows whose image path lies outside `root` (a resolved folder), each with why.

  Nothing is opened: an absolute path, or one whose `..` parts or symlinks lead out of `root` once resolved.
  """
  out = []
  for r in rows:
    if os.path.isabs(r.name) or pathlib.PureWindowsPath(r.name).drive:
      out.append((r, "is an absolute path"))
      continue
    resolved = pathlib.Path(os.path.realpath(root / r.name))
    if not resolved.is_relative_to(root):
      how = "leads out of it through a symlink" if ".." not in pathlib.PurePosixPath(r.name).parts else \
          "leads out of it with '..'"
      out.append((r, how))
  return out


def _refuse_outside(layout: readers.Layout, root: pathlib.Path, outside: list[tuple[readers.Row, str]]) -> None:
  r, how = outside[0]
  more = ""
  if len(outside) > 1:
    others = "; ".join(f"{o.file}, {o.row}: {o.name!r}" for o, _ in outside[1:4])
    more = f" ({len(outside) - 1} more row(s) too: {others}{' ...' if len(outside) > 4 else ''})"
  raise problems.DatasetError(
      layout.name, r.file, r.row, f"image path {r.name!r} {how}: every image must lie inside the release folder "
      f"{root}{more}. Nothing was read. If the label file is yours and lists images elsewhere on purpose, build "
      "with allow_outside_paths=True (prepare: --allow_outside_paths)")


def collect(layout: readers.Layout, root: pathlib.Path, *, skip_bad: bool = False, decode_check: str = "full",
            liqe_dir: str | os.PathLike[str] | None = None, liqe_folder: str | None = None,
            num_threads: int | None = None, allow_outside_paths: bool = False) -> Collected:
  """Reads and checks a release folder.

  Args:
    layout: the dataset's layout.
    root: the extracted release folder (manual_dir).
    skip_bad: skip bad rows (recorded in the returned log) instead of raising.
    decode_check: "full" (decode every image), "verify" (PIL header/structure check only, faster) or "none".
    liqe_dir: folder holding LIQE's per-dataset split folders (e.g. tests/data/labels/liqe_splits), or None.
    liqe_folder: the dataset's folder name under liqe_dir (default: liqe.LIQE_FOLDERS[layout.name]).
    num_threads: decode-check threads (PIL releases the GIL while decoding).
    allow_outside_paths: accept image paths outside `root` (absolute, `..`, symlinks out); off by default, as a
      label file from elsewhere must not make the builder read files outside the release folder.

  Returns:
    The examples in label-file order, the problem log and the dataset-level metadata.
  """
  if decode_check not in DECODE_CHECKS:
    raise ValueError(f"decode_check must be one of {DECODE_CHECKS}, got {decode_check!r}")
  root = pathlib.Path(root).expanduser().resolve()
  check_root(layout, root)
  log = problems.ProblemLog(layout.name, skip_bad)
  listing = layout.read(root, log)
  outside = outside_paths(root, listing.rows)
  if outside and not allow_outside_paths:
    _refuse_outside(layout, root, outside)
  rows, case_fixes = _match_files(listing, root, log)
  _report_unlabelled(listing, root, rows, log)
  if decode_check != "none" and rows:
    rows = _decode_check(rows, root, log, decode_check, num_threads)
  examples, liqe_meta = _join_liqe(layout, root, rows, liqe_dir, liqe_folder)
  metadata = _metadata(layout, root, listing, examples, log, liqe_meta, case_fixes=case_fixes,
                       decode_check=decode_check, allow_outside_paths=allow_outside_paths, outside=len(outside))
  return Collected(examples, log, metadata)


def _match_files(listing: readers.Listing, root: pathlib.Path,
                 log: problems.ProblemLog) -> tuple[list[readers.Row], int]:
  """The rows whose image file exists (its name's case fixed to the file's), less duplicates (reported)."""
  index = _CaseIndex(root)
  by_name: dict[str, list[readers.Row]] = {}
  for r in listing.rows:
    by_name.setdefault(r.name, []).append(r)
  rows: list[readers.Row] = []
  case_fixes = 0
  for r in listing.rows:
    same = by_name[r.name]
    if len(same) > 1:
      where = "; ".join(f"{o.file}, {o.row} (score {o.mos!r})" for o in same)
      agree = len({(o.mos, repr(o.mos_std), o.content_id) for o in same}) == 1
      if agree and r is same[0]:
        pass  # identical repeats: keep the first, report the others
      elif agree:
        log.add(problems.DUPLICATE, r.file, r.row, r.name, f"{r.name} is named by several rows with the same "
                f"labels: {where}")
        continue
      else:
        # Conflicting labels for one image: no row can be trusted, all are reported and skipped.
        log.add(problems.DUPLICATE, r.file, r.row, r.name, f"{r.name} is named by several rows with different "
                f"labels: {where}")
        continue
    found = index.resolve(r.name)
    if found is None:
      log.add(problems.MISSING_IMAGE, r.file, r.row, r.name, f"image file {r.name} not found in {root}")
      continue
    if found != r.name:
      case_fixes += 1
      r = dataclasses.replace(r, name=found)
    rows.append(r)
  return rows, case_fixes


def _report_unlabelled(listing: readers.Listing, root: pathlib.Path, rows: list[readers.Row],
                       log: problems.ProblemLog) -> None:
  """Reports image files in the release's own folders that no label row names."""
  labelled = {r.name.lower() for r in listing.rows} | {n.lower() for n in listing.not_rated}
  labelled |= {r.name.lower() for r in rows} | {p.name.lower() for p in log.problems}  # skipped rows are labelled
  for folder, recursive in listing.owned_dirs:
    for rel in image_files(root, folder, recursive):
      if rel.lower() not in labelled:
        log.add(problems.UNLABELLED_IMAGE, rel, None, rel,
                f"image file {rel} is in {folder or '.'}/ but no row of {', '.join(listing.label_files)} names it")


def _decode_check(rows: list[readers.Row], root: pathlib.Path, log: problems.ProblemLog, decode_check: str,
                  num_threads: int | None) -> list[readers.Row]:
  """The rows whose image decodes (in threads: PIL decodes without the GIL); the others are reported."""
  workers = num_threads or min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    errors = list(pool.map(lambda r: decode_error(root / r.name, r.name, decode_check), rows))
  kept = []
  for r, err in zip(rows, errors):
    if err is None:
      kept.append(r)
    else:
      log.add(problems.UNDECODABLE, r.file, r.row, r.name, f"image file {r.name} does not decode: {err}")
  return kept


def _join_liqe(layout: readers.Layout, root: pathlib.Path, rows: list[readers.Row],
               liqe_dir: str | os.PathLike[str] | None,
               liqe_folder: str | None) -> tuple[list[Example], dict[str, Any]]:
  """The examples, with LIQE's scene/distortion labels joined by relative path, and what the join found."""
  liqe_labels: dict[str, liqe.LiqeLabel] = {}
  liqe_meta: dict[str, Any] = {"dir": None}
  folder = liqe_folder or liqe.LIQE_FOLDERS.get(layout.name)
  if liqe_dir is not None:
    liqe_meta = {"dir": str(liqe_dir), "folder": folder}
    if folder is None:
      liqe_meta["note"] = "LIQE has no split files for this dataset"
    else:
      d = pathlib.Path(liqe_dir).expanduser() / folder
      if not d.is_dir():
        raise problems.DatasetError(layout.name, str(d), None, f"no LIQE split folder {folder}/ in liqe_dir {liqe_dir} "
                                    f"(found {readers.listing(pathlib.Path(liqe_dir).expanduser())})")
      liqe_labels = liqe.read_split_files(d, layout.name)
  liqe_lower = {k.lower(): v for k, v in liqe_labels.items()}

  examples = []
  matched = 0
  no_scene = (False,) * len(classes.SCENES)
  for r in rows:
    lab = liqe_labels.get(r.name) or liqe_lower.get(r.name.lower())
    matched += lab is not None
    scene = lab.scene if lab else r.scene
    examples.append(Example(
        path=root / r.name, name=r.name, mos=r.mos, mos_std=r.mos_std, content_id=r.content_id,
        official_split=r.official_split, scene=scene or no_scene, has_scene=scene is not None,
        distortion=lab.distortion if lab else -1, distortion_fine=lab.distortion_fine if lab else -1,
        has_distortion=lab is not None))
  if liqe_dir is not None and folder is not None:
    liqe_meta.update(matched=matched, unmatched_liqe_paths=len(liqe_labels) - matched)
  return examples, liqe_meta


def _metadata(layout: readers.Layout, root: pathlib.Path, listing: readers.Listing, examples: list[Example],
              log: problems.ProblemLog, liqe_meta: dict[str, Any], *, case_fixes: int, decode_check: str,
              allow_outside_paths: bool, outside: int) -> dict[str, Any]:
  """The dataset-level metadata, with per-record index columns."""
  mos = np.array([e.mos for e in examples], np.float64)
  splits: dict[str, int] = {}
  for e in examples:
    if e.official_split:
      splits[e.official_split] = splits.get(e.official_split, 0) + 1
  observed = [float(mos.min()), float(mos.max())] if len(mos) else None
  metadata = {
      "dataset": layout.name,
      "title": layout.title,
      "homepage": layout.homepage,
      "mos_kind": layout.mos_kind,
      "higher_is_better": layout.higher_is_better,
      "mos_range": list(layout.mos_range) if layout.mos_range else observed,
      "mos_range_source": "nominal" if layout.mos_range else "observed",
      "mos_observed": observed,
      "content_kind": layout.content_kind,
      "num_examples": len(examples),
      "num_contents": len({e.content_id for e in examples}),
      # The release's own split: its part names and sizes (metadata keys of built datasets, kept as they are).
      "official_split_names": list(layout.official_splits),
      "official_splits": splits,
      "label_files": {f: sha256(root / f) for f in listing.label_files if (root / f).is_file()},
      "excluded": listing.excluded,
      "notes": listing.notes,
      "name_case_fixes": case_fixes,
      "decode_check": decode_check,
      "allow_outside_paths": allow_outside_paths,
      "outside_paths": outside,
      "liqe": liqe_meta,
      "has_scene": sum(e.has_scene for e in examples),
      "has_distortion": sum(e.has_distortion for e in examples),
      "skipped": len(log.problems),
      "problems": log.as_json(),
      # Per-record columns (record i = entry i), so splits and MOS statistics need no pass over the image bytes.
      "index": {
          "name": [e.name for e in examples],
          "content_id": [e.content_id for e in examples],
          "mos": [float(np.float32(e.mos)) for e in examples],
          "official_split": [e.official_split for e in examples],
      },
  }
  return metadata
