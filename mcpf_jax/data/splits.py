"""Train/test splits by content: deterministic, identical on every machine and NumPy version.

The order of contents for seed s is the sort order of sha256(f"{s}:{content_id}") over the unique content ids, so it
depends only on the ids' strings and the seed (no RNG stream whose algorithm could change between library
versions). The first round(train_fraction * n_contents) contents in that order are the training side. Every record of
a content goes to the side of its content, so no content is on both sides. Ten seeds 0..9 give the ten 80/20 splits
of the protocol; releases with an official split (KonIQ) also have `official_split_indices`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np

PROTOCOL_SEEDS = tuple(range(10))


def content_order(content_ids: Sequence[str] | np.ndarray, seed: int | str) -> list[str]:
  """Unique content ids in the seed's order (sorted by sha256 of "<seed>:<id>" in UTF-8, ties by id)."""
  unique = sorted({str(c) for c in np.asarray(content_ids, dtype=object).tolist()})
  salt = seed if isinstance(seed, str) else str(int(seed))
  key = lambda c: (hashlib.sha256(f"{salt}:{c}".encode()).hexdigest(), c)
  return sorted(unique, key=key)


def _take(content_ids: np.ndarray, chosen: set[str]) -> tuple[np.ndarray, np.ndarray]:
  mask = np.fromiter((c in chosen for c in content_ids), bool, count=len(content_ids))
  return np.flatnonzero(mask).astype(np.int64), np.flatnonzero(~mask).astype(np.int64)


def _count(fraction: float, n: int) -> int:
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"fraction must be in (0, 1), got {fraction}")
  if n < 2:
    raise ValueError(f"need at least 2 distinct contents to split, got {n}")
  # Round half up (not Python's half-to-even), and keep both sides non-empty.
  return min(max(math.floor(fraction * n + 0.5), 1), n - 1)


def split_indices(content_ids: Sequence[str] | np.ndarray, seed: int,
                  train_fraction: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
  """A seeded train/test split of record positions by content.

  Args:
    content_ids: str [n], the content id of each record (IqaSource.content_ids).
    seed: split seed (the protocol uses 0..9).
    train_fraction: fraction of CONTENTS on the training side (of images, for authentic datasets where each image
      is its own content).

  Returns:
    (train_idx, test_idx): int64 ascending record positions; disjoint, together all of 0..n-1.
  """
  ids = np.asarray([str(c) for c in np.asarray(content_ids, dtype=object).tolist()], dtype=object)
  order = content_order(ids, seed)
  n_train = _count(train_fraction, len(order))
  return _take(ids, set(order[:n_train]))


def validation_split(content_ids: Sequence[str] | np.ndarray, train_idx: Sequence[int] | np.ndarray, seed: int,
                     val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
  """Carves a validation set out of a training side, by content.

  Args:
    content_ids: str [n], content id of every record (the whole dataset).
    train_idx: int [m], the training side's record positions.
    seed: seed of the carve-out (salted differently from split_indices, so it is not the same order).
    val_fraction: fraction of the training side's contents that go to validation.

  Returns:
    (train_idx, val_idx): int64 ascending record positions, a partition of train_idx by content.
  """
  ids = np.asarray([str(c) for c in np.asarray(content_ids, dtype=object).tolist()], dtype=object)
  train_idx = np.asarray(train_idx, np.int64)
  sub = ids[train_idx]
  order = content_order(sub, f"val-{int(seed)}")
  n_val = _count(val_fraction, len(order))
  val_pos, train_pos = _take(sub, set(order[:n_val]))
  return np.sort(train_idx[train_pos]), np.sort(train_idx[val_pos])


def official_split_indices(official_split: Sequence[str] | np.ndarray) -> dict[str, np.ndarray]:
  """Record positions of each official split name (IqaSource.official_split); records with "" are left out."""
  names = np.asarray([str(s) for s in np.asarray(official_split, dtype=object).tolist()], dtype=object)
  return {s: np.flatnonzero(names == s).astype(np.int64) for s in sorted(set(names.tolist())) if s}


def check_disjoint(content_ids: Sequence[str] | np.ndarray, *sides: Sequence[int] | np.ndarray) -> None:
  """Raises ValueError if a record or a content appears on two sides."""
  ids = np.asarray([str(c) for c in np.asarray(content_ids, dtype=object).tolist()], dtype=object)
  seen_records: set[int] = set()
  seen_contents: dict[str, int] = {}
  for k, side in enumerate(sides):
    side = np.asarray(side, np.int64)
    if seen_records & set(side.tolist()):
      raise ValueError(f"side {k} shares records with an earlier side")
    seen_records |= set(side.tolist())
    for c in set(ids[side].tolist()):
      if seen_contents.setdefault(c, k) != k:
        raise ValueError(f"content {c!r} is on sides {seen_contents[c]} and {k}")
