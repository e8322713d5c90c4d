"""The train step (mcpf_jax/train/step.py) on a tiny model: gradient accumulation and the non-finite guard."""

import jax
import numpy as np
import optax
import pytest

from mcpf_jax import clip
from mcpf_jax import model as iqa
from mcpf_jax.clip.tiny import write_tiny_clip
from mcpf_jax.model import freeze
from mcpf_jax.train import optim
from mcpf_jax.train import step as step_lib
from tests.batches import iqa_batch

IMAGE = 32
SMALL = dict(width=32, layers=1, heads=4, image_size=IMAGE, patch_size=8, embed_dim=24)
MODEL = dict(name="mcpf", prompt_depth=2, num_text_prompts=4, num_vision_prompts=4, text_prompt_init="a photo of a",
             fusion_width=16, fusion_heads=2, query_heads=2, aux=("scene",))
# No cross-example pairs (rank = 0): every term is a mean over examples, so micro-batch means average to the
# big batch's mean when each micro-batch has as many labelled examples.
NO_PAIRS = {"rank": 0.0, "l1": 1.0, "cls": 0.5, "aux": 0.1}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  bundle = clip.load(write_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=1, **SMALL))
  model, params = iqa.build(MODEL, bundle, jax.random.key(0))
  return model, params, freeze.mask(params, "prompts")


def _batch(n: int, seed: int = 0) -> dict[str, np.ndarray]:
  """n examples; every micro-batch of 4 holds 2 scene mask and 2 distortion mask (equal counts per half)."""
  return iqa_batch(n, IMAGE, seed, has_scene=[1, 0, 1, 0], has_distortion=[0, 1, 1, 0])


# One SGD step with lr 1: the parameter change is minus the (accumulated) gradient itself, so it shows any
# difference between the two gradients (Adam's first step is lr * g / (|g| + eps): it turns float noise in
# gradients that are exactly 0 in theory, e.g. attention key biases, into full-size sign flips). The learning
# rate lives in the optimizer state (inject_hyperparams), so a NaN rate needs no new compilation.
_WEIGHTS = {"no_pairs": NO_PAIRS}
_compiled = {}


def _step(tiny, weights: str, accumulate_steps: int, batch: dict[str, np.ndarray], lr: float = 1.0):
  """(new trainable params {path: array}, metrics) after one step from the initial state (jitted once per key)."""
  model, params, mask = tiny
  key = (weights, accumulate_steps)
  if key not in _compiled:
    sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
    tx = optax.multi_transform({freeze.TRAINABLE: sgd, freeze.FROZEN: optax.set_to_zero()}, mask)
    init = jax.jit(lambda p: step_lib.init_state(p, tx))
    _compiled[key] = init, jax.jit(step_lib.make_train_step(model, mask, tx, _WEIGHTS[weights], accumulate_steps))
  init, step = _compiled[key]
  state = init(params)
  state["opt"] = optax.tree.set(state["opt"], learning_rate=np.float32(lr))
  state, metrics = step(state, batch)
  trainable, _ = optim.partition(jax.device_get(state["params"]), mask)
  return trainable, jax.device_get(metrics)


def _flat(tree: dict) -> np.ndarray:
  return np.concatenate([np.ravel(tree[k]) for k in sorted(tree)])


def _rel(a: dict, b: dict) -> float:
  """|a - b| / |b| over all leaves together (some leaves' gradients are exactly 0 in theory)."""
  return float(np.linalg.norm(_flat(a) - _flat(b)) / np.linalg.norm(_flat(b)))


def test_accumulation_matches_one_big_batch(tiny):
  """2 micro-batches of 4 give the big batch's loss, gradient norm and (SGD) update."""
  batch = _batch(8)
  before, _ = optim.partition(tiny[1], tiny[2])
  one, m1 = _step(tiny, "no_pairs", 1, batch)
  acc, m2 = _step(tiny, "no_pairs", 2, batch)
  assert m1["finite"] and m2["finite"]
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-4)
  delta_one = {k: one[k] - np.asarray(before[k]) for k in one}
  delta_acc = {k: acc[k] - np.asarray(before[k]) for k in acc}
  assert np.linalg.norm(_flat(delta_one)) > 1e-3  # the step did something
  assert _rel(delta_acc, delta_one) < 1e-4


def test_accumulation_averages_micro_batch_means(tiny):
  """Where micro-batches hold different numbers of labelled examples, their masked means are averaged with equal
  weight, so the update differs from the big batch's (the comparison above would see it: 'nearly' the same)."""
  batch = _batch(8)
  batch["has_scene"] = np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)
  one, _ = _step(tiny, "no_pairs", 1, batch)
  acc, _ = _step(tiny, "no_pairs", 2, batch)
  assert _rel(acc, one) > 1e-3


def test_batch_not_divisible_into_micro_batches_is_an_error(tiny):
  with pytest.raises((ValueError, TypeError)):
    _step(tiny, "no_pairs", 3, _batch(8))


def test_non_finite_update_is_flagged_although_the_loss_is_finite(tiny):
  """A NaN learning rate: loss and gradients are finite, the updated prompts are not; the step must say so."""
  batch = _batch(8)
  new, metrics = _step(tiny, "no_pairs", 1, batch, lr=float("nan"))
  assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
  assert not np.isfinite(_flat(new)).all()
  assert not metrics["finite"]
  _, metrics = _step(tiny, "no_pairs", 1, batch)
  assert metrics["finite"]


def test_nan_loss_is_flagged(tiny):
  batch = _batch(8)
  batch["mos01"][1] = np.nan
  _, metrics = _step(tiny, "no_pairs", 1, batch)
  assert not np.isfinite(metrics["loss"]) and not metrics["finite"]
