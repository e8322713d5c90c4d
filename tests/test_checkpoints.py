"""Checkpoints (mcpf_jax/train/checkpoints.py): keep the last K and the best by validation SRCC, restore exactly."""

import math

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from mcpf_jax import runs
from mcpf_jax.model import freeze
from mcpf_jax.train import checkpoints as ckpt_lib
from mcpf_jax.train import optim
from mcpf_jax.train import step as step_lib

OPTIM = ConfigDict(dict(lr=1e-2, warmup_steps=0, total_steps=10, final_lr_fraction=0.0, weight_decay=0.0, b1=0.9,
                        b2=0.999, grad_clip_norm=0.0))


def _state(value: float = 1.0):
  """A run-like state: trainable prompts, a frozen "clip" subtree, AdamW state over the prompts only."""
  params = {"prompts": jnp.full((2, 3), value), "clip": {"w": jnp.arange(4.0)}}
  mask = freeze.mask(params, "prompts")
  tx = optim.make_optimizer(OPTIM, mask)
  return step_lib.init_state(params, tx), mask, tx


def _iterator():
  return iter(grain.MapDataset.range(100).to_iter_dataset())


def _save_all(directory, srccs, keep=2):
  state, mask, _ = _state()
  it = _iterator()
  ckpts = ckpt_lib.Checkpoints(directory, keep=keep)
  for step, srcc in enumerate(srccs, start=1):
    next(it)
    ckpts.save(step, state, mask, it, {"dataset": "x"}, None if srcc is None else {runs.BEST_METRIC: srcc})
  ckpts.wait()
  return ckpts


def test_keeps_last_k_and_the_best_by_validation_srcc(tmp_path):
  ckpts = _save_all(tmp_path / "ck", [0.1, 0.9, 0.2, 0.3, 0.4], keep=2)
  assert ckpts.all_steps() == [2, 4, 5]  # the last 2, and step 2 (highest SRCC), not step 1 (lowest)
  assert ckpts.best_step() == 2 and ckpts.latest_step() == 5
  ckpts.close()
  # A new manager (eval.py, a resumed run) reads the metrics back from disk.
  reopened = ckpt_lib.Checkpoints(tmp_path / "ck", keep=2, read_only=True)
  assert reopened.all_steps() == [2, 4, 5] and reopened.best_step() == 2
  reopened.close()


def test_best_moves_to_a_later_better_checkpoint(tmp_path):
  ckpts = _save_all(tmp_path / "ck", [0.5, 0.2, 0.3, 0.8, 0.1], keep=1)
  assert ckpts.all_steps() == [4, 5] and ckpts.best_step() == 4
  ckpts.close()


def test_nan_srcc_is_never_the_best(tmp_path):
  ckpts = _save_all(tmp_path / "ck", [0.3, math.nan, math.nan], keep=1)
  assert ckpts.best_step() == 1 and ckpts.all_steps() == [1, 3]
  ckpts.close()


def test_without_validation_metrics_only_the_last_k_are_kept(tmp_path):
  ckpts = _save_all(tmp_path / "ck", [None, None, None, None], keep=2)
  assert ckpts.all_steps() == [3, 4] and ckpts.best_step() is None
  ckpts.close()


def test_restore_state_and_iterator_position_frozen_leaves_from_the_target(tmp_path):
  state, mask, tx = _state(2.0)
  # A state after one real update: non-trivial optimizer moments and step count.
  grads = jax.tree.map(jnp.ones_like, state["params"])
  updates, opt = tx.update(grads, state["opt"], state["params"])
  state = {"params": optim.apply_updates(state["params"], updates, mask), "opt": opt, "step": state["step"] + 1}
  it = _iterator()
  for _ in range(7):
    next(it)
  ckpts = ckpt_lib.Checkpoints(tmp_path / "ck", keep=2)
  ckpts.save(7, state, mask, it, {"dataset": "x"}, {runs.BEST_METRIC: 0.5})
  ckpts.wait()
  # The backbone is not in the checkpoint: restoring into a target with other frozen values keeps those.
  target, _, _ = _state(0.0)
  target["params"]["clip"]["w"] = jnp.full((4,), 5.0)
  fresh = _iterator()
  restored = ckpts.restore(7, target, mask, None, fresh)
  ckpts.close()
  np.testing.assert_array_equal(restored["params"]["prompts"], state["params"]["prompts"])
  np.testing.assert_array_equal(restored["params"]["clip"]["w"], np.full((4,), 5.0))
  assert int(restored["step"]) == 1
  for a, b in zip(jax.tree.leaves(restored["opt"]), jax.tree.leaves(state["opt"])):
    np.testing.assert_array_equal(a, b)
  assert next(fresh) == 7  # the iterator continues where the saved one stood


def test_backbone_fingerprint_mismatch_is_refused(tmp_path):
  meta = {"backbone": {"source": "tiny_clip", "fingerprint": "abc"}}
  runs.check_backbone(meta, "tiny_clip", "abc", tmp_path)
  with pytest.raises(ValueError, match=r"fingerprint abc.*fingerprint def"):
    runs.check_backbone(meta, "other_clip", "def", tmp_path)
