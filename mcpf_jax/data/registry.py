"""The one list of datasets: every name the package knows comes from here (builders, prepare, `data.NAMES`).

`LAYOUTS` maps each benchmark's name to its release layout (layouts.py), in the order the README lists them; `CSV`
is the user's own csv dataset (csv_layout.py), which has no fixed release. `NAMES` is both. The TFDS builders
(builders.BUILDERS), prepare's dataset argument and `mcpf_jax.data.NAMES` are derived from these. `GENERATED` holds
the datasets a plugin writes on first use (the smoke data: mcpf_jax.smoke), built as csv datasets.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from mcpf_jax.data import layouts, problems
from mcpf_jax.data.readers import Layout, listing

LAYOUTS: dict[str, type[Layout]] = {
    cls.name: cls for cls in (layouts.Livec, layouts.Koniq10k, layouts.Spaq, layouts.Live, layouts.Csiq,
                              layouts.Tid2013, layouts.Kadid10k, layouts.Agiqa1k, layouts.Agiqa3k,
                              layouts.Aigciqa2023)}
CSV = "csv"
NAMES: tuple[str, ...] = (*LAYOUTS, CSV)


@dataclasses.dataclass(frozen=True)
class Generated:
  """A dataset written by code on first use, registered under a data.name by a plugin (a module of config.plugins):
  `write_release(folder)` writes its raw release (images and a csv) into `folder`, which the csv builder builds
  with `csv` (the CsvConfig fields) as the csv config named after the dataset."""
  csv: Mapping[str, Any]
  write_release: Callable[[pathlib.Path], Any]


GENERATED: dict[str, Generated] = {}


def register_generated(name: str, dataset: Generated) -> None:
  """Makes data.name=`name` the generated dataset `dataset` (built on first use by the training run)."""
  if name in NAMES:
    raise ValueError(f"generated dataset {name!r}: the name is one of the built-in datasets {list(NAMES)}")
  GENERATED[name] = dataset


def wrong_folder_error(layout: Layout, root: pathlib.Path) -> problems.DatasetError:
  """An error saying what the release folder should hold, what it holds, and where the release might be."""
  missing = [" or ".join(g) for g in layout.required if not any((root / p).exists() for p in g)]
  detail = f"expected {layout.expected} in {root}; missing {missing}; found {listing(root)}"
  hints = []
  if root.is_dir():
    for sub in _subfolders(root, depth=2):
      if layout.looks_like(sub):
        hints.append(f"did you mean {sub}?")
        break
  for other_name, other_cls in LAYOUTS.items():
    if other_name != layout.name and other_cls().looks_like(root):
      hints.append(f"this folder looks like the {other_name} release")
  if not root.exists():
    detail = f"the folder {root} does not exist (expected the extracted {layout.title} release with {layout.expected})"
  return problems.DatasetError(layout.name, str(root), None, detail + ("; " + "; ".join(hints) if hints else ""))


def _subfolders(root: pathlib.Path, depth: int) -> Iterable[pathlib.Path]:
  frontier = [root]
  for _ in range(depth):
    nxt = []
    for d in frontier:
      try:
        subs = sorted(e.path for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))
      except OSError:
        continue
      for s in subs:
        yield pathlib.Path(s)
        nxt.append(pathlib.Path(s))
    frontier = nxt
