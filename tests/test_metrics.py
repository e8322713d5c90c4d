"""Metrics against direct textbook computations (O(n^2) Kendall, average-rank Spearman, numpy Pearson)."""

import numpy as np
import pytest

from mcpf_jax import metrics


def _avg_ranks(x):
  x = np.asarray(x)
  ranks = np.empty(len(x))
  order = np.argsort(x, kind="stable")
  i = 0
  while i < len(x):
    j = i
    while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
      j += 1
    ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
    i = j + 1
  return ranks


def _kendall_tau_b(x, y):
  n = len(x)
  conc = disc = tx = ty = 0
  for i in range(n):
    for j in range(i + 1, n):
      dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
      if dx == 0 and dy == 0:
        continue
      if dx == 0:
        tx += 1
      elif dy == 0:
        ty += 1
      elif dx == dy:
        conc += 1
      else:
        disc += 1
  return (conc - disc) / np.sqrt((conc + disc + tx) * (conc + disc + ty))


@pytest.mark.parametrize("ties", [False, True])
def test_correlations_match_definitions(ties):
  rng = np.random.default_rng(0)
  mos = rng.normal(size=60)
  pred = mos + rng.normal(scale=0.7, size=60)
  if ties:  # heavy ties on both sides, as with 5-level scores
    mos, pred = np.round(mos * 2) / 2, np.round(pred)
  np.testing.assert_allclose(metrics.srcc(pred, mos), np.corrcoef(_avg_ranks(pred), _avg_ranks(mos))[0, 1],
                             rtol=1e-12)
  np.testing.assert_allclose(metrics.plcc(pred, mos), np.corrcoef(pred, mos)[0, 1], rtol=1e-12)
  np.testing.assert_allclose(metrics.krcc(pred, mos), _kendall_tau_b(pred, mos), rtol=1e-12)
  np.testing.assert_allclose(metrics.rmse(pred, mos), np.sqrt(np.mean((pred - mos) ** 2)), rtol=1e-12)


def test_hand_computed_small_case():
  pred, mos = [1.0, 2.0, 3.0, 4.0], [10.0, 30.0, 20.0, 40.0]
  assert metrics.srcc(pred, mos) == pytest.approx(0.8)  # 1 - 6*2/(4*15)
  assert metrics.krcc(pred, mos) == pytest.approx(4 / 6)  # 5 concordant, 1 discordant


def test_logistic_fit_recovers_known_curve():
  true = (90.0, 10.0, 0.5, 0.12)
  x = np.linspace(-0.2, 1.2, 80)
  y = metrics.logistic4(x, *true)
  fit = metrics.fit_logistic(x, y)
  assert fit.converged
  np.testing.assert_allclose(fit(x), y, atol=1e-6)
  np.testing.assert_allclose(fit.params[:3], true[:3], rtol=1e-5)
  assert abs(fit.params[3]) == pytest.approx(true[3], rel=1e-5)
  assert metrics.plcc_logistic(x, y) == pytest.approx(1.0, abs=1e-9)
  # A monotone but non-linear relation: raw PLCC < 1, fitted PLCC ~ 1.
  assert metrics.plcc(x, y) < 0.99


def test_decreasing_relation_dmos():
  rng = np.random.default_rng(1)
  quality = rng.uniform(size=50)
  dmos = 100 - 80 * quality + rng.normal(scale=2, size=50)
  out = metrics.evaluate(quality, dmos, higher_is_better=False)
  assert out["srcc"] > 0.9 and out["plcc"] > 0.9 and out["krcc"] > 0.7
  assert out["plcc_logistic"] > 0.9 and out["logistic_converged"]
  assert metrics.srcc(quality, dmos) < -0.9  # raw convention kept by the plain functions
  assert out["num_images"] == 50


def test_bad_input_errors():
  with pytest.raises(ValueError, match="differ in length"):
    metrics.srcc([1, 2, 3], [1, 2, 3, 4])
  with pytest.raises(ValueError, match="non-finite"):
    metrics.plcc([1, 2, np.nan], [1, 2, 3])
  with pytest.raises(ValueError, match="at least 3"):
    metrics.krcc([1, 2], [1, 2])
