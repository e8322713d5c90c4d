"""Content splits: disjoint by content, deterministic (golden list, an independent re-derivation), 80/20 by content."""

import hashlib

import numpy as np
import pytest

from mcpf_jax.data import splits


def live_like_ids() -> np.ndarray:
  """29 references with 20-35 distorted images each, interleaved as in a label file."""
  rng = np.random.default_rng(5)
  ids = [f"ref{r:02d}.bmp" for r in range(29) for _ in range(rng.integers(20, 36))]
  return np.array(ids, dtype=object)[rng.permutation(len(ids))]


def test_golden_seed0():
  ids = [f"img{k:02d}" for k in range(10)]
  train, test = splits.split_indices(ids, seed=0)
  # Fixed forever: any machine, any NumPy version (the order is sha256("0:<id>"), no RNG stream).
  assert train.tolist() == [0, 1, 2, 3, 4, 5, 6, 8] and test.tolist() == [7, 9]
  assert splits.content_order(ids, 0) == ["img04", "img01", "img03", "img00", "img05", "img08", "img06", "img02",
                                          "img07", "img09"]


def test_matches_the_documented_rule():
  ids = live_like_ids()
  for seed in (0, 3, 9):
    # Independent derivation of the documented rule: unique ids sorted by sha256("<seed>:<id>"), the first
    # round(0.8 * n) go to training.
    unique = sorted(set(ids.tolist()), key=lambda c: hashlib.sha256(f"{seed}:{c}".encode()).hexdigest())
    chosen = set(unique[:round(0.8 * len(unique))])
    train, test = splits.split_indices(ids, seed=seed)
    assert train.tolist() == [i for i, c in enumerate(ids) if c in chosen]
    assert test.tolist() == [i for i, c in enumerate(ids) if c not in chosen]


def test_disjoint_complete_and_80_20_by_content():
  ids = live_like_ids()
  for seed in splits.PROTOCOL_SEEDS:
    train, test = splits.split_indices(ids, seed)
    assert train.dtype == np.int64 and np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    assert not set(ids[train]) & set(ids[test])
    assert sorted(train.tolist() + test.tolist()) == list(range(len(ids)))
    assert len(set(ids[train])) == 23 and len(set(ids[test])) == 6  # round(0.8 * 29)
    splits.check_disjoint(ids, train, test)
  # Authentic datasets: every image is its own content, so the ratio is over images.
  train, test = splits.split_indices([f"Images/{k}.bmp" for k in range(1162)], seed=4)
  assert (len(train), len(test)) == (930, 232)


def test_deterministic_seeded_and_order_independent():
  ids = live_like_ids()
  runs = [splits.split_indices(ids, s)[0].tolist() for s in splits.PROTOCOL_SEEDS]
  assert runs == [splits.split_indices(ids, s)[0].tolist() for s in splits.PROTOCOL_SEEDS]
  assert len({tuple(r) for r in runs}) == 10  # ten different splits
  # The contents on each side depend on the ids, not on the record order.
  perm = np.random.default_rng(1).permutation(len(ids))
  train_p, _ = splits.split_indices(ids[perm], seed=2)
  train, _ = splits.split_indices(ids, seed=2)
  assert set(ids[perm][train_p]) == set(ids[train])


def test_validation_carve_out_by_content():
  ids = live_like_ids()
  train, test = splits.split_indices(ids, seed=0)
  fit, val = splits.validation_split(ids, train, seed=0, val_fraction=0.15)
  assert sorted(fit.tolist() + val.tolist()) == train.tolist()
  splits.check_disjoint(ids, fit, val, test)
  assert len(set(ids[val])) == 3  # round(0.15 * 23)
  again = splits.validation_split(ids, train, seed=0, val_fraction=0.15)
  assert again[1].tolist() == val.tolist()


def test_official_split_indices():
  official = ["training", "test", "", "validation", "training"]
  got = splits.official_split_indices(official)
  assert {k: v.tolist() for k, v in got.items()} == {"test": [1], "training": [0, 4], "validation": [3]}


def test_check_disjoint_catches_shared_content_and_records():
  ids = ["a", "a", "b", "c"]
  with pytest.raises(ValueError, match="content 'a' is on sides 0 and 1"):
    splits.check_disjoint(ids, [0, 2], [1, 3])
  with pytest.raises(ValueError, match="shares records"):
    splits.check_disjoint(ids, [0, 1], [1])


def test_bad_arguments():
  with pytest.raises(ValueError, match="fraction"):
    splits.split_indices(["a", "b"], 0, train_fraction=1.0)
  with pytest.raises(ValueError, match="at least 2 distinct contents"):
    splits.split_indices(["a", "a"], 0)
