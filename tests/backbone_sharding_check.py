"""Run by tests/test_backbone_sharding.py in a process of 4 CPU devices (XLA_FLAGS set before jax starts).

For each backbone family (a tiny CLIP and a tiny SigLIP, both written in the real format): train.py's jitted train
and eval steps (`step.jit_steps`) on a data=2 x model=2 mesh with `mesh.shard_backbone` on, against the same steps
with the backbone replicated: which backbone leaves are split over "model", the eval scores, the loss of two
steps, the first step's gradient norm, the all-gathers of the compiled sharded train step, and (shapes only) the
optimizer state's shardings when the whole backbone trains. The tiny backbones' leaves are all below the size from
which the rule shards (`mesh._MIN_SHARDED_SIZE`, 2^18 elements), so it is lowered here to 512: the rule and the
sharded program are what is under test, not the threshold. Also the rule at its real
threshold on the real SigLIP 2 So400m/14-384 shapes (no weights): the share of the backbone's bytes it splits.
Prints one JSON line.
"""

import json
import math
import os
import sys
import tempfile

# (LLVM's optimisations off: each CPU compile ~3x faster; the computation is the same.)
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"

import jax
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mcpf_jax import clip
from mcpf_jax import model as iqa
from mcpf_jax.aot import report
from mcpf_jax.clip import siglip
from mcpf_jax.clip.tiny import write_tiny_clip
from mcpf_jax.model import freeze
from mcpf_jax.train import mesh as mesh_lib
from mcpf_jax.train import optim
from mcpf_jax.train import step as step_lib
from tests.batches import iqa_batch
from tests.siglip_support import write_tiny_siglip

IMAGE = 32
MODEL = dict(name="mcpf", prompt_depth=2, num_text_prompts=4, num_vision_prompts=4, text_prompt_init="a photo of a",
             fusion_width=16, fusion_heads=2, query_heads=2, aux=())
OPTIM = dict(lr=1e-2, warmup_steps=0, total_steps=10, final_lr_fraction=0.0, weight_decay=1e-4, b1=0.9, b2=0.999,
             grad_clip_norm=1.0)
THRESHOLD = 512


def _run(bundle, shard: bool) -> dict:
  model, params = iqa.build(MODEL, bundle, jax.random.key(0))
  mask = freeze.mask(params, "prompts")
  tx = optim.make_optimizer(ml_collections.ConfigDict(OPTIM), mask)
  config = ml_collections.ConfigDict(dict(mesh=dict(shard_backbone=shard), train=dict(accumulate_steps=1),
                                          loss=dict(rank=1.0, l1=1.0, cls=0.5, aux=0.0)))
  mesh = mesh_lib.make_mesh(2, 2)
  state = step_lib.init_state(params, tx)
  train_step, eval_step, s_sh, _, b_sh = step_lib.jit_steps(config, model, mask, tx, params, state, mesh)
  state = jax.device_put(jax.device_get(state), s_sh)  # a copy: the step donates it, the bundle's arrays stay
  crops = iqa_batch(4 * 2, IMAGE, seed=9)["image"].reshape(4, 2, IMAGE, IMAGE, 3)
  scores = np.asarray(eval_step(state["params"], jax.device_put({"image": crops}, b_sh)))
  losses, norms = [], []
  for seed in range(2):
    state, metrics = train_step(state, jax.device_put(iqa_batch(8, IMAGE, seed=seed), b_sh))
    losses.append(float(metrics["loss"]))
    norms.append(float(metrics["grad_norm"]))
  flat = jax.tree_util.tree_flatten_with_path(state["params"])[0]
  split = sorted(jax.tree_util.keystr(k, simple=True, separator="/") for k, v in flat
                 if "model" in jax.tree.leaves(tuple(v.sharding.spec)))
  split_bytes = sum(v.nbytes for _, v in flat if "model" in jax.tree.leaves(tuple(v.sharding.spec)))
  # The all-gathers of the compiled train step, as the pre-flight's table counts them (per device, in the HLO).
  hlo = train_step.lower(state, jax.device_put(iqa_batch(8, IMAGE, seed=0), b_sh)).compile().as_text()
  gathers = report.collectives(hlo).get("all-gather", {"count": 0, "bytes": 0})
  return {"losses": losses, "norms": norms, "scores": scores, "split": split, "split_bytes": split_bytes,
          "gathers": gathers}


def _compare(family: str, folder: str) -> dict:
  if family == "clip":
    write_tiny_clip(folder, seed=1, width=32, layers=1, heads=4, image_size=IMAGE, patch_size=8, embed_dim=24)
  else:
    write_tiny_siglip(folder, seed=1, image_size=IMAGE)
  bundle = clip.load(folder)
  sharded, replicated = _run(bundle, True), _run(bundle, False)
  # (Not the updated prompts elementwise: Adam moves an element by ~lr whatever its gradient's size, so elements
  # whose gradient is ~0 take either sign from float noise; the loss, gradient norm and scores are what count.)
  return {"family": family, "split": sharded["split"], "replicated_split": replicated["split"],
          "split_bytes": sharded["split_bytes"], "gathers": sharded["gathers"],
          "loss_diff": max(abs(a - b) for a, b in zip(sharded["losses"], replicated["losses"])),
          "grad_norm_diff": abs(sharded["norms"][0] - replicated["norms"][0]) / replicated["norms"][0],
          "score_diff": float(np.max(np.abs(sharded["scores"] - replicated["scores"]))),
          "finite": bool(np.all(np.isfinite(sharded["losses"])) and np.all(np.isfinite(sharded["scores"])))}


def _full_finetune_state(bundle) -> dict:
  """With the whole backbone trained, the optimizer state's shardings (shapes only): Adam's moments of each split
  parameter must be split like it, the rest replicated."""
  _, params = iqa.build(MODEL, bundle, jax.random.key(0))
  mask = freeze.mask(params, "all")
  tx = optim.make_optimizer(ml_collections.ConfigDict(OPTIM), mask)
  mesh = mesh_lib.make_mesh(2, 2)
  state = jax.eval_shape(lambda p: step_lib.init_state(p, tx), params)
  p_sh = mesh_lib.param_shardings(params, mesh, True)
  specs = {jax.tree_util.keystr(k, simple=True, separator="/"): sh.spec
           for k, sh in jax.tree_util.tree_flatten_with_path(p_sh)[0]}
  s_sh = mesh_lib.state_shardings(state, p_sh, mesh, True)
  split = mismatched = 0
  for k, sh in jax.tree_util.tree_flatten_with_path(s_sh["opt"])[0]:
    name = jax.tree_util.keystr(k, simple=True, separator="/")
    param = next((name[name.index(m) + 4:] for m in ("/mu/", "/nu/") if m in name), None)
    want = specs[param] if param is not None else jax.sharding.PartitionSpec()
    mismatched += sh.spec != want
    split += "model" in jax.tree.leaves(tuple(sh.spec))
  return {"opt_leaves_split": split, "opt_leaves_mismatched": mismatched}


def _real_size_share(name: str) -> float:
  """Share of a real SigLIP 2's backbone bytes that the rule (real threshold) splits over a model axis of 2."""
  shapes = {"clip": siglip.param_shapes(siglip.HUB_CONFIGS[name])}
  specs = mesh_lib.param_shardings(shapes, mesh_lib.make_mesh(2, 2), shard_backbone=True)
  total = split = 0
  for shape, sharding in zip(jax.tree.leaves(shapes), jax.tree.leaves(specs)):
    size = math.prod(shape.shape)
    total += size
    split += size if "model" in tuple(sharding.spec) else 0
  return split / total


if __name__ == "__main__":
  real = _real_size_share("google/siglip2-so400m-patch14-384")  # at the real threshold, before lowering it
  mesh_lib._MIN_SHARDED_SIZE = THRESHOLD  # pylint: disable=protected-access
  with tempfile.TemporaryDirectory() as tmp:
    results = [_compare(f, os.path.join(tmp, f)) for f in ("clip", "siglip")]
    full = _full_finetune_state(clip.load(os.path.join(tmp, "clip")))
  print(json.dumps({"results": results, "so400m_share_split": real, "full_finetune": full}))
