"""What a score means: the map between a dataset's MOS (or DMOS) and the model's [0, 1] quality score.

One class, `ScoreMap`, used by the input pipeline (training targets), evaluation (predicted MOS), the Scorer
(reported scores) and checkpoint metadata (stored under the key "label_transform", the name it had when the
first checkpoints were written; the key stays so they still load).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

# Tolerance of the level bin edges, in bins: float32 scores sit within ~1e-7 of their decimal value.
_EDGE_TOLERANCE = 1e-5


@dataclasses.dataclass(frozen=True)
class ScoreMap:
  """Maps a dataset's scores to the model's targets; fitted on the TRAINING split only.

  * `mos01 = (mos - low) / (high - low)` for MOS (higher is better), `(high - mos) / (high - low)` for DMOS:
    the direction is flipped here, once, and recorded in `higher_is_better`. [low, high] is `mos_range` when
    given (the dataset's nominal scale), else the training split's observed [min, max]. Training values fall in
    [0, 1]; test values outside the range map outside it (not clipped, so `to_mos` is an exact inverse).
  * `mos_std01 = mos_std / (high - low)`: the same scaling, no shift.
  * `level`: `num_levels` equal-width bins over the TRAINING split's observed range of mos01
    ([train_low01, train_high01]); 0 is the worst ("bad"), num_levels - 1 the best ("perfect"). Bins are
    half-open [edge, next edge) (the top bin includes the training maximum); values outside the training range
    are clipped into the first / last bin.

  Attributes:
    low, high: the score range that maps to [0, 1].
    higher_is_better: False for DMOS-like scores (flipped in mos01).
    train_low01, train_high01: the training split's range on the mos01 scale (the level bins' range).
    num_levels: number of quality levels.
  """
  low: float
  high: float
  higher_is_better: bool
  train_low01: float
  train_high01: float
  num_levels: int = 5

  def __post_init__(self):
    if not (math.isfinite(self.low) and math.isfinite(self.high) and self.high > self.low):
      raise ValueError(f"ScoreMap needs a finite range low < high, got [{self.low}, {self.high}]")
    if not self.train_high01 > self.train_low01:
      raise ValueError(f"ScoreMap needs train_low01 < train_high01, got [{self.train_low01}, "
                       f"{self.train_high01}]")
    if self.num_levels < 1:
      raise ValueError(f"num_levels must be at least 1, got {self.num_levels}")

  @classmethod
  def fit(cls, mos: Sequence[float] | np.ndarray, higher_is_better: bool,
          mos_range: tuple[float, float] | None = None, num_levels: int = 5) -> ScoreMap:
    """Fits the transform on the training split's scores.

    Args:
      mos: float [n] scores of the TRAINING split, as stored (MOS or DMOS).
      higher_is_better: True for MOS, False for DMOS.
      mos_range: the nominal (low, high) of the scale, or None for the training split's observed range.
      num_levels: number of quality levels (the model's class words).

    Raises:
      ValueError: no scores, NaN/inf scores, or all scores equal (no range to bin).
    """
    values = np.asarray(mos, np.float64).reshape(-1)
    if values.size == 0:
      raise ValueError("ScoreMap.fit: no training scores")
    if not np.isfinite(values).all():
      bad = np.flatnonzero(~np.isfinite(values))
      raise ValueError(f"ScoreMap.fit: {bad.size} non-finite training scores (first at position {bad[0]})")
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
      raise ValueError(f"ScoreMap.fit: all {values.size} training scores equal {lo}; no range to bin")
    low, high = (lo, hi) if mos_range is None else (float(mos_range[0]), float(mos_range[1]))
    if mos_range is not None and (lo < low or hi > high):
      raise ValueError(f"ScoreMap.fit: training scores span [{lo}, {hi}], outside mos_range {mos_range}")
    ends = sorted(_to01(np.array([lo, hi]), low, high, higher_is_better).tolist())
    return cls(low=low, high=high, higher_is_better=bool(higher_is_better), train_low01=ends[0],
               train_high01=ends[1], num_levels=int(num_levels))

  def mos01(self, mos: float | np.ndarray) -> np.ndarray:
    """float32 [...]: scores on the [0, 1] higher-is-better scale."""
    return _to01(np.asarray(mos, np.float64), self.low, self.high, self.higher_is_better).astype(np.float32)

  def mos_std01(self, mos_std: float | np.ndarray) -> np.ndarray:
    """float32 [...]: standard deviations on the mos01 scale (NaN stays NaN)."""
    return (np.asarray(mos_std, np.float64) / (self.high - self.low)).astype(np.float32)

  def level(self, mos: float | np.ndarray) -> np.ndarray:
    """int32 [...]: the quality level (0 = worst) of scores, binned on the training range."""
    m01 = _to01(np.asarray(mos, np.float64), self.low, self.high, self.higher_is_better)
    t = (m01 - self.train_low01) / (self.train_high01 - self.train_low01)
    # Bins are [edge_k, edge_k+1); _EDGE_TOLERANCE (in bins) puts a score stored as float32 just below an edge
    # (e.g. 1.8 on a [1, 5] scale) on the edge, as written in decimal.
    return np.clip(np.floor(t * self.num_levels + _EDGE_TOLERANCE), 0, self.num_levels - 1).astype(np.int32)

  def to_mos(self, score01: float | np.ndarray) -> np.ndarray:
    """float64 [...]: the inverse of mos01, back on the dataset's own scale and direction."""
    return self._from01(np.asarray(score01, np.float64))

  def to_mos_jax(self, score01: Any) -> Any:
    """`to_mos` on a jax array, in its dtype: jit- and grad-able (the map is affine)."""
    return self._from01(score01)

  def _from01(self, s: Any) -> Any:
    span = self.high - self.low
    return self.low + s * span if self.higher_is_better else self.high - s * span

  @property
  def score_range(self) -> tuple[float, float]:
    """(lowest, highest) score `to_mos` gives for the model's score01 in [0, 1]: [low, high] of the scale."""
    return (self.low, self.high)

  @classmethod
  def identity(cls) -> ScoreMap:
    """score01 as it is ([0, 1], higher is better): zero-shot models."""
    return cls(low=0.0, high=1.0, higher_is_better=True, train_low01=0.0, train_high01=1.0)


def _to01(mos: np.ndarray, low: float, high: float, higher_is_better: bool) -> np.ndarray:
  t = (mos - low) / (high - low)
  return t if higher_is_better else 1.0 - t
