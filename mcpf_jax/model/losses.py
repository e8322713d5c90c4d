"""Training losses of the IQA heads: fidelity ranking, L1, level cross-entropy, auxiliary cross-entropies.

All functions are pure jnp, take per-example arrays and a boolean/float `weight` (mask) per example, and return a
scalar mean over the valid examples (0 when none is valid, never NaN). Labels follow the batch format of
`mcpf_jax.train` (see `batch_loss`): MOS already normalised to [0, 1] with higher = better.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

_SQRT2 = 1.4142135623730951


def _masked_mean(values: jax.Array, weight: jax.Array) -> jax.Array:
  weight = weight.astype(values.dtype)
  return jnp.sum(values * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def _normal_cdf(x: jax.Array) -> jax.Array:
  return 0.5 * (1.0 + jax.lax.erf(x / _SQRT2))


def fidelity_ranking(score: jax.Array, mos: jax.Array, mos_std: jax.Array | None = None,
                     weight: jax.Array | None = None, eps: float = 1e-8) -> jax.Array:
  """Pairwise fidelity loss over all ordered pairs (i != j) of a batch (LIQE, Thurstone case V).

  Predicted preference: p_hat_ij = Phi((s_i - s_j) / sqrt(2)). Target: p_ij = Phi((m_i - m_j) / sqrt(std_i^2 +
  std_j^2)) where both MOS stds are known (> 0), else 1 / 0.5 / 0 for m_i >, =, < m_j.
  Loss_ij = 1 - sqrt(p_ij * p_hat_ij + eps) - sqrt((1 - p_ij) * (1 - p_hat_ij) + eps).

  Args:
    score: [batch] predicted quality (any scale; only differences matter).
    mos: [batch] target quality, higher = better, on the same scale as `mos_std`.
    mos_std: [batch] MOS standard deviations, NaN or <= 0 where unknown. None: hard targets.
    weight: [batch] example mask.
  Returns:
    scalar mean over valid pairs.
  """
  n = score.shape[0]
  weight = jnp.ones((n,), score.dtype) if weight is None else weight.astype(score.dtype)
  ds = score[:, None] - score[None, :]
  dm = mos[:, None] - mos[None, :]
  p_hat = _normal_cdf(ds / _SQRT2)
  hard = jnp.where(dm > 0, 1.0, jnp.where(dm < 0, 0.0, 0.5))
  if mos_std is None:
    p = hard
  else:
    var = mos_std[:, None] ** 2 + mos_std[None, :] ** 2
    known = (jnp.nan_to_num(mos_std, nan=0.0)[:, None] > 0) & (jnp.nan_to_num(mos_std, nan=0.0)[None, :] > 0)
    soft = _normal_cdf(dm / jnp.sqrt(jnp.where(known, var, 1.0)))
    p = jnp.where(known, soft, hard)
  loss = 1.0 - jnp.sqrt(p * p_hat + eps) - jnp.sqrt((1.0 - p) * (1.0 - p_hat) + eps)
  pair_w = weight[:, None] * weight[None, :] * (1.0 - jnp.eye(n, dtype=score.dtype))
  return jnp.sum(loss * pair_w) / jnp.maximum(jnp.sum(pair_w), 1.0)


def l1(pred: jax.Array, target: jax.Array, weight: jax.Array | None = None) -> jax.Array:
  """Mean absolute error; pred and target [batch] on the same (normalised) scale."""
  weight = jnp.ones_like(pred) if weight is None else weight
  return _masked_mean(jnp.abs(pred - target), weight)


def cross_entropy(logits: jax.Array, labels: jax.Array, weight: jax.Array | None = None) -> jax.Array:
  """Softmax cross-entropy with integer labels. logits [batch, classes], labels int [batch]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  labels = jnp.clip(labels, 0, logits.shape[-1] - 1)  # masked rows may carry -1
  nll = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
  weight = jnp.ones_like(nll) if weight is None else weight
  return _masked_mean(nll, weight)


def multilabel_cross_entropy(logits: jax.Array, targets: jax.Array, weight: jax.Array | None = None) -> jax.Array:
  """Softmax cross-entropy against a multi-hot target spread evenly over its positive classes (LIQE's scenes).

  logits [batch, classes]; targets multi-hot [batch, classes]. Rows with no positive class contribute nothing.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  targets = targets.astype(jnp.float32)
  count = jnp.sum(targets, axis=-1)
  dist = targets / jnp.maximum(count, 1.0)[:, None]
  nll = -jnp.sum(dist * logp, axis=-1)
  weight = jnp.ones_like(nll) if weight is None else weight.astype(jnp.float32)
  return _masked_mean(nll, weight * (count > 0))


def batch_loss(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
               weights: Mapping[str, float]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The weighted training objective of the IQA model.

  Args:
    outputs: from `IQAModel.__call__`: "score" [B] the expected level (its differences drive the ranking
      loss, as in LIQE), "score01" [B] the same mapped to [0, 1], "quality_logits" [B, L], optionally
      "scene_logits" [B, S], "distortion_logits" [B, D].
    batch: "mos01" [B] normalised MOS (higher = better), "mos_std01" [B] (NaN if unknown), "level" int [B],
      optional "weight" [B] (0 for padding rows), "scene" [B, S] multi-hot + "has_scene" [B],
      "distortion" int [B] + "has_distortion" [B].
    weights: "rank", "l1", "cls", "aux" (a zero weight skips that term).
  Returns:
    (total loss, dict of the individual terms for logging).
  """
  w = batch.get("weight")
  terms = {}
  if weights.get("rank", 0.0):
    terms["rank"] = fidelity_ranking(outputs["score"], batch["mos01"], batch.get("mos_std01"), w)
  if weights.get("l1", 0.0):
    terms["l1"] = l1(outputs["score01"], batch["mos01"], w)
  if weights.get("cls", 0.0) and "quality_logits" in outputs:
    terms["cls"] = cross_entropy(outputs["quality_logits"], batch["level"], w)
  aux = []
  if weights.get("aux", 0.0):
    base = jnp.ones_like(batch["mos01"]) if w is None else w
    if "scene_logits" in outputs and "scene" in batch:
      terms["scene"] = multilabel_cross_entropy(outputs["scene_logits"], batch["scene"], base * batch["has_scene"])
      aux.append(terms["scene"])
    if "distortion_logits" in outputs and "distortion" in batch:
      terms["distortion"] = cross_entropy(outputs["distortion_logits"], batch["distortion"],
                                          base * batch["has_distortion"])
      aux.append(terms["distortion"])
  total = jnp.zeros((), jnp.float32)
  for name in ("rank", "l1", "cls"):
    if name in terms:
      total = total + weights[name] * terms[name]
  if aux:
    total = total + weights["aux"] * sum(aux)
  terms["total"] = total
  return total, terms
