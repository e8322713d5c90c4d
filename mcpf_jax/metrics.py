"""IQA evaluation metrics: SRCC, PLCC (raw and after the VQEG 4-parameter logistic fit), KRCC, RMSE.

Plain functions of 1-D numpy arrays (host side; evaluation sets are small). Correlations come from scipy.stats,
the logistic fit from scipy.optimize.curve_fit.

Direction: for DMOS datasets (lower is better) a good model has NEGATIVE SRCC against the raw labels. Pass
`higher_is_better=False` to report correlations in the "higher is better" convention (sign flipped once, here,
and recorded in the result) instead of flipping labels anywhere else.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np
from scipy import optimize, stats


def _as_1d(name: str, x: Any) -> np.ndarray:
  a = np.asarray(x, dtype=np.float64)
  if a.ndim != 1:
    raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
  if not np.all(np.isfinite(a)):
    raise ValueError(f"{name} has {np.sum(~np.isfinite(a))} non-finite values")
  return a


def _check_pair(pred: Any, mos: Any) -> tuple[np.ndarray, np.ndarray]:
  p, m = _as_1d("pred", pred), _as_1d("mos", mos)
  if p.shape != m.shape:
    raise ValueError(f"pred and mos differ in length: {p.shape[0]} vs {m.shape[0]}")
  if p.shape[0] < 3:
    raise ValueError(f"need at least 3 images for correlations, got {p.shape[0]}")
  return p, m


def srcc(pred: Any, mos: Any) -> float:
  """Spearman rank correlation (ties get average ranks)."""
  p, m = _check_pair(pred, mos)
  return float(stats.spearmanr(p, m).statistic)


def krcc(pred: Any, mos: Any) -> float:
  """Kendall rank correlation, tau-b (handles ties)."""
  p, m = _check_pair(pred, mos)
  return float(stats.kendalltau(p, m).statistic)


def plcc(pred: Any, mos: Any) -> float:
  """Pearson linear correlation of the raw predictions."""
  p, m = _check_pair(pred, mos)
  return float(stats.pearsonr(p, m).statistic)


def rmse(pred: Any, mos: Any) -> float:
  p, m = _check_pair(pred, mos)
  return float(np.sqrt(np.mean((p - m) ** 2)))


def logistic4(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
  """VQEG 4-parameter logistic: (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2."""
  z = np.clip(-(x - b3) / (np.abs(b4) + 1e-12), -500.0, 500.0)
  return (b1 - b2) / (1.0 + np.exp(z)) + b2


@dataclasses.dataclass(frozen=True)
class LogisticFit:
  params: tuple[float, float, float, float]
  converged: bool

  def __call__(self, x: Any) -> np.ndarray:
    return logistic4(np.asarray(x, np.float64), *self.params)


def fit_logistic(pred: Any, mos: Any) -> LogisticFit:
  """Least-squares fit of `logistic4` mapping predictions onto MOS (VQEG FR-TV Phase II).

  Initial guess as in the VQEG report: b1 = max(mos), b2 = min(mos), b3 = mean(pred), b4 = std(pred). Works for
  decreasing relations too (b1 < b2). A fit that does not converge is never silently replaced by something
  else: `converged=False` is returned with the initial guess, and `evaluate` reports NaN for it.
  """
  p, m = _check_pair(pred, mos)
  spread = float(np.std(p)) or 1.0
  p0 = (float(np.max(m)), float(np.min(m)), float(np.mean(p)), spread)
  if stats.spearmanr(p, m).statistic < 0:  # decreasing relation: start from the mirrored curve.
    p0 = (p0[1], p0[0], p0[2], p0[3])
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", optimize.OptimizeWarning)
      params, _ = optimize.curve_fit(logistic4, p, m, p0=p0, maxfev=20000)
    return LogisticFit(tuple(float(v) for v in params), True)
  except RuntimeError:
    return LogisticFit(p0, False)


def plcc_logistic(pred: Any, mos: Any) -> float:
  """PLCC after the 4-parameter logistic fit (the number IQA papers report as PLCC)."""
  p, m = _check_pair(pred, mos)
  fit = fit_logistic(p, m)
  return float(stats.pearsonr(fit(p), m).statistic)


def evaluate(pred: Any, mos: Any, *, higher_is_better: bool = True) -> dict[str, Any]:
  """All metrics at once, as written to eval.json.

  With `higher_is_better=False` (DMOS labels) correlations are sign-flipped so that a good model reports
  positive numbers; `label_direction` records that this happened.
  """
  p, m = _check_pair(pred, mos)
  sign = 1.0 if higher_is_better else -1.0
  fit = fit_logistic(p, m)
  return {
      "srcc": sign * srcc(p, m),
      "plcc": sign * plcc(p, m),
      "plcc_logistic": float(stats.pearsonr(fit(p), m).statistic) * (1.0 if fit.converged else float("nan")),
      "krcc": sign * krcc(p, m),
      "rmse": rmse(p, m),
      "rmse_logistic": rmse(fit(p), m),
      "logistic_converged": fit.converged,
      "label_direction": "higher_is_better" if higher_is_better else "lower_is_better (signs flipped)",
      "num_images": int(p.shape[0]),
  }
