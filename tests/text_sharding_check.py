"""Run by tests/test_text_sharding.py in a process of 4 CPU devices (XLA_FLAGS set before jax starts).

For each variant: the IQA model's scores and prompt gradients with the class-prompt rows spread over the mesh's
data axis (IQAModel.text_sharding, as step.jit_steps sets it) against the same jitted computation with every
device encoding every row; and each program's FLOPs per device (XLA's count). Prints one JSON line.
"""

import json
import os
import sys
import types

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mcpf_jax.train import mesh as mesh_lib
from tests import test_reference_math as ref


def _compare(variant: str, data: int) -> dict:
  config = ref._clip_config()
  bundle = types.SimpleNamespace(config=config, tokenizer=ref.Tokenizer.default(), params=jax.tree.map(
      lambda a: jnp.asarray(a, jnp.float32), ref.perturbed_params(config, seed=5, logit_scale=ref.LOGIT_SCALE)))
  model, params = ref._build(bundle, variant)
  mesh = mesh_lib.make_mesh(data, 4 // data)
  sharded = model.clone(text_sharding=mesh_lib.text_rows_sharding(mesh))
  pixels = np.random.default_rng(7).normal(size=(4, ref.IMAGE, ref.IMAGE, 3)).astype(np.float32)
  pixels = jax.device_put(pixels, NamedSharding(mesh, P("data")))
  prompts = {k: v for k, v in params.items() if k != "clip"}

  def run(m):
    def loss(trainable):
      out = m.apply({"params": {**params, **trainable}}, pixels)
      return jnp.sum(out["score"] * jnp.arange(1.0, 5.0)) + jnp.sum(out["scene_logits"]), out["score"]
    return jax.jit(jax.value_and_grad(loss, has_aux=True))

  replicated = run(model).lower(prompts).compile()
  (_, want), want_grads = replicated(prompts)
  compiled = run(sharded).lower(prompts).compile()
  (_, got), got_grads = compiled(prompts)
  diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
           zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads))]
  scale = max(float(np.max(np.abs(np.asarray(g)))) for g in jax.tree.leaves(want_grads))
  return {"variant": variant, "data": data, "score_diff": float(np.max(np.abs(np.asarray(got) - np.asarray(want)))),
          "grad_diff": max(diffs) / scale, "flops": compiled.cost_analysis()["flops"],
          "replicated_flops": replicated.cost_analysis()["flops"]}


if __name__ == "__main__":
  print(json.dumps([_compare(v, d) for v, d in (("mcpf", 4), ("mpiqe", 2))]))
