"""The train step and the eval step: pure functions of (state, batch), jitted by the caller with shardings.

State is a plain dict (big_vision style): {"params": the full parameter tree (CLIP included), "opt": optimizer
state (trainable leaves only), "step": int32 scalar}. Only the trainable leaves are differentiated, so no
gradient of the frozen backbone's weights is ever computed; frozen leaves pass through the step untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mcpf_jax.clip import preprocess
from mcpf_jax.model import losses
from mcpf_jax.train import mesh as mesh_lib
from mcpf_jax.train import optim

State = dict[str, Any]
Batch = Mapping[str, jax.Array]


def init_state(params: Any, tx: optax.GradientTransformation) -> State:
  return {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}


def _all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def make_train_step(model, mask: Any, tx: optax.GradientTransformation, loss_weights: Mapping[str, float],
                    accumulate_steps: int = 1, gather: mesh_lib.GatherOnce | None = None
                    ) -> Callable[[State, Batch], tuple[State, dict[str, jax.Array]]]:
  """Returns `train_step(state, batch) -> (state, metrics)`.

  Args:
    model: the IQAModel.
    mask: "trainable" / "frozen" at every leaf of the parameters (model.freeze.mask).
    tx: from optim.make_optimizer.
    loss_weights: {"rank", "l1", "cls", "aux"}.
    accumulate_steps: split the batch into this many micro-batches, run them one after another (lax.scan) and
      apply their averaged gradient once: the same update as the whole batch, with a fraction of the memory.
      Two exceptions: the fidelity ranking loss pairs images within a micro-batch only, and a masked mean (a
      label set only some images have) is taken per micro-batch, then averaged with equal weights.
    gather: with a backbone stored split over "model" (mesh.gather_once): its weights gathered once per step and
      the images spread over data x model. The same numbers.

  The batch holds "image" uint8 [B, H, W, 3] (normalised here, on device) and the label arrays of
  losses.batch_loss. metrics: "loss", each loss term, "grad_norm", "finite" (False when the loss or a
  gradient or an updated trainable parameter is NaN/inf: the caller stops and keeps its last good checkpoint),
  "lr"-free (the loop logs it).
  """
  weights = dict(loss_weights)

  def loss_fn(trainable, frozen, batch):
    images = batch["image"]
    if gather is not None:  # a trainable split weight: gathered here, so its gradient is reduce-scattered back
      trainable, images = gather.weights(trainable), gather.spread(images)
    params = optim.merge(trainable, frozen)
    out = model.apply({"params": params}, preprocess.normalize(images), train=True)
    return losses.batch_loss(out, batch, weights)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
    trainable, frozen = optim.partition(state["params"], mask)
    if gather is not None:  # once per step, outside the gradient (the forward and the backward read this copy)
      frozen = gather.weights(frozen)
    if accumulate_steps == 1:
      (loss, terms), grads = grad_fn(trainable, frozen, batch)
    else:
      micro = jax.tree.map(lambda x: x.reshape((accumulate_steps, x.shape[0] // accumulate_steps) + x.shape[1:]),
                           dict(batch))

      def body(carry, mb):
        (l, t), g = grad_fn(trainable, frozen, mb)
        return jax.tree.map(jnp.add, carry, (l, t, g)), None

      zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(trainable, frozen,
                                                                         jax.tree.map(lambda x: x[0], micro))))
      (loss, terms, grads), _ = jax.lax.scan(body, (zero[0][0], zero[0][1], zero[1]), micro)
      loss, terms, grads = jax.tree.map(lambda x: x / accumulate_steps, (loss, terms, grads))
    # The optimizer sees the whole tree; frozen leaves get zeros, which set_to_zero discards (XLA removes them).
    full_grads = optim.merge(grads, jax.tree.map(jnp.zeros_like, frozen))
    updates, opt = tx.update(full_grads, state["opt"], state["params"])
    params = optim.apply_updates(state["params"], updates, mask)
    metrics = dict(terms)
    metrics["loss"] = loss
    metrics["grad_norm"] = optax.tree.norm(grads)
    # The new trainable parameters too: a finite loss and gradient can still give an inf/NaN update (a huge or
    # NaN learning rate), and the state after this step is what the next checkpoint saves.
    new_trainable, _ = optim.partition(params, mask)
    metrics["finite"] = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(new_trainable)
    return {"params": params, "opt": opt, "step": state["step"] + 1}, metrics

  return train_step


def make_eval_step(model, gather: mesh_lib.GatherOnce | None = None) -> Callable[[Any, Batch], jax.Array]:
  """Returns `eval_step(params, batch) -> score01 [B]`: the mean over crops of the predicted score on [0, 1].

  batch["image"] is uint8 [B, crops, H, W, 3]; every crop of every image goes through the model in one call.
  `gather`: as in make_train_step.
  """

  def eval_step(params: Any, batch: Batch) -> jax.Array:
    images = batch["image"]
    b, c = images.shape[:2]
    images = images.reshape((b * c,) + images.shape[2:])
    if gather is not None:
      params, images = gather.weights(params), gather.spread(images)
    out = model.apply({"params": params}, preprocess.normalize(images))
    return jnp.mean(out["score01"].reshape(b, c), axis=1)

  return eval_step


def _shard_text(model, mesh: jax.sharding.Mesh, gather: mesh_lib.GatherOnce | None):
  """On a data axis of more than one device (data x model with `gather`), each device encodes its share of the
  class prompts (IQAModel.text_sharding); one device keeps the plain path."""
  if mesh.shape["data"] * (mesh.shape["model"] if gather is not None else 1) > 1:
    return model.clone(text_sharding=mesh_lib.text_rows_sharding(mesh, both_axes=gather is not None))
  return model


def jit_steps(config, model, mask: Any, tx: optax.GradientTransformation, params: Any, state_shapes: State,
              mesh: jax.sharding.Mesh):
  """The jitted train and eval steps of a run, with their shardings: what train.py runs, built from shapes alone.

  `params` and `state_shapes` may be arrays or `jax.ShapeDtypeStruct`s (nothing is read from them but shapes),
  so the same programs can be lowered ahead of time for another platform.

  Returns:
    (train_step, eval_step, state_shardings, param_shardings, batch_sharding). train_step donates the state.
  """
  gather = mesh_lib.gather_once(mesh, config.mesh.shard_backbone)
  model = _shard_text(model, mesh, gather)
  p_sh = mesh_lib.param_shardings(params, mesh, config.mesh.shard_backbone)
  s_sh = mesh_lib.state_shardings(state_shapes, p_sh, mesh, config.mesh.shard_backbone)
  b_sh = mesh_lib.batch_sharding(mesh)
  rep = mesh_lib.replicated(mesh)
  weights = {k: float(config.loss[k]) for k in ("rank", "l1", "cls", "aux")}
  train_step = jax.jit(make_train_step(model, mask, tx, weights, config.train.accumulate_steps, gather),
                       in_shardings=(s_sh, b_sh), out_shardings=(s_sh, rep), donate_argnums=0)
  eval_step, _, _ = jit_eval(config, model, params, mesh)
  return train_step, eval_step, s_sh, p_sh, b_sh


def jit_eval(config, model, params: Any, mesh: jax.sharding.Mesh):
  """The jitted eval step alone, as `jit_steps` makes it, for what evaluates without training (no optimizer).

  Returns:
    (eval_step, param_shardings, batch_sharding).
  """
  gather = mesh_lib.gather_once(mesh, config.mesh.shard_backbone)
  model = _shard_text(model, mesh, gather)
  p_sh = mesh_lib.param_shardings(params, mesh, config.mesh.shard_backbone)
  b_sh = mesh_lib.batch_sharding(mesh)
  step = jax.jit(make_eval_step(model, gather), in_shardings=(p_sh, b_sh), out_shardings=mesh_lib.replicated(mesh))
  return step, p_sh, b_sh
