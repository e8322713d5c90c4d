"""The programs of a pre-flight: the model, its state and batches as shapes, the train and eval steps of train.py
(`step.jit_steps`) lowered and compiled for a target, and the numbers of one pre-flight (`preflight`).
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp

from mcpf_jax import model as iqa
from mcpf_jax import resolve, runs
from mcpf_jax.aot import report as report_lib
from mcpf_jax.aot.targets import PreflightError, Target
from mcpf_jax.clip import config as clip_config
from mcpf_jax.clip.siglip import SiglipConfig
from mcpf_jax.clip.tokenizer import Tokenizer
from mcpf_jax.clip.tuning import attention_for, chunking
from mcpf_jax.model import flops as flops_lib
from mcpf_jax.model import freeze
from mcpf_jax.train import mesh as mesh_lib
from mcpf_jax.train import optim
from mcpf_jax.train import step as step_lib


def clip_config_for(config, platform: str):
  """The run's CLIPConfig (no weights read), with the compute options of config.clip and the target platform."""
  generated = runs.BACKBONES.get(config.clip.name)  # registered by config.plugins (resolve.load_plugins)
  if generated is not None:
    cc = generated.clip_config(generated.recipe(config))
  else:
    try:
      cc = clip_config.from_name(config.clip.name)
    except ValueError as e:
      raise PreflightError(f"--config.clip.name: {e}") from e
  return cc.replace(dtype=config.clip.dtype, remat=bool(config.clip.remat), platform=platform,
                    **runs.compute_options(config, cc, config.clip.name))


def build(config, platform: str):
  """(model, param shapes, mask, tx, state shapes) of `config`, for `platform`, without computing anything."""
  cc = clip_config_for(config, platform)
  # CLIP: OpenAI's BPE (every CLIP preset's tokenizer), whose end-of-text position sets the text span the program
  # computes. SigLIP's text tower computes all its positions whatever the ids: placeholder ids of that length give
  # the same program, without the checkpoint's tokenizer.json.
  tokenizer = None if isinstance(cc, SiglipConfig) else Tokenizer.from_bpe_file()
  model = iqa.module(config.model, cc, tokenizer)
  params = iqa.abstract_params(model)
  # The frozen backbone as train.py stores it (clip.param_dtype): bf16 storage halves its bytes.
  store = jnp.dtype(config.clip.get("param_dtype", "float32"))
  params = dict(params, clip=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, store), params["clip"]))
  mask = freeze.mask(params, config.model.trainable)
  tx = optim.make_optimizer(resolve.optim_config(config, 1), mask)
  state = jax.eval_shape(lambda p: step_lib.init_state(p, tx), params)
  return model, params, mask, tx, state


def train_batch_shapes(batch: int, image_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The train batch of mcpf_jax.data.pipeline.train_loader (int64 index arrives as int32 without x64)."""
  f32, i32 = jnp.float32, jnp.int32
  return {"image": jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.uint8),
          "mos": jax.ShapeDtypeStruct((batch,), f32), "mos01": jax.ShapeDtypeStruct((batch,), f32),
          "mos_std01": jax.ShapeDtypeStruct((batch,), f32), "level": jax.ShapeDtypeStruct((batch,), i32),
          "scene": jax.ShapeDtypeStruct((batch, 9), f32), "has_scene": jax.ShapeDtypeStruct((batch,), f32),
          "distortion": jax.ShapeDtypeStruct((batch,), i32), "has_distortion": jax.ShapeDtypeStruct((batch,), f32),
          "index": jax.ShapeDtypeStruct((batch,), i32)}


def eval_batch_shapes(batch: int, crops: int, image_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """What the trainer's evaluation passes to the eval step: the crops only."""
  return {"image": jax.ShapeDtypeStruct((batch, crops, image_size, image_size, 3), jnp.uint8)}


def _bytes_per_device(shapes: Any) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (its shard of each leaf)."""
  return sum(math.prod(s.sharding.shard_shape(s.shape)) * jnp.dtype(s.dtype).itemsize for s in jax.tree.leaves(shapes))


def _split_bytes(shapes: Any, shardings: Any) -> tuple[int, int]:
  """Whole bytes of the leaves stored split over "model" (mesh.shard_backbone), and of those a step gathers once
  (mesh.GatherOnce: all but the token embeddings)."""
  split = gathered = 0
  for (path, s), sh in zip(jax.tree_util.tree_flatten_with_path(shapes)[0], jax.tree.leaves(shardings)):
    if "model" in jax.tree.leaves(tuple(sh.spec)):
      size = math.prod(s.shape) * jnp.dtype(s.dtype).itemsize
      split += size
      skipped = mesh_lib.GATHER_SKIPS.search(jax.tree_util.keystr(path, simple=True, separator="/"))
      gathered += 0 if skipped else size
  return split, gathered


def _with_sharding(shapes: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def compile_program(jitted, *args) -> dict[str, Any]:
  """Lower + compile; {"fits", "compile_s", memory..., "flops_per_device", "collectives"} or the OOM's numbers."""
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except  (XlaRuntimeError/JaxRuntimeError by version)
    message = str(e)
    if not report_lib.OOM.search(message):
      raise
    required, available = report_lib.oom_bytes(message)
    return {"fits": False, "compile_s": time.perf_counter() - start, "peak_bytes": required,
            "compiler_limit_bytes": available, "error": message.strip().splitlines()[0][:500]}
  out = {"fits": True, "compile_s": time.perf_counter() - start, **report_lib.memory(compiled),
         "flops_per_device": report_lib.flops(compiled), "collectives": report_lib.collectives(compiled.as_text())}
  out["_compiled"] = compiled
  out["_lowered"] = lowered
  return out



def preflight(config, target: Target, *, mfu: float = 0.4, steps: tuple[str, ...] = ("train", "eval"),
              keep_programs: bool = False) -> dict[str, Any]:
  """Compiles the config's train and eval steps for `target` and returns the report (see `mcpf_jax.aot`'s docstring).

  steps: which programs to compile ("train", "eval"); `fits` covers those compiled.
  """
  n = len(target.devices)
  try:
    mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.model, devices=target.devices)
  except ValueError as e:
    raise PreflightError(f"--config.mesh.data={config.mesh.data} / --config.mesh.model={config.mesh.model} on "
                         f"{target.name}: {e}") from e
  # The config the real run resolves on this mesh (batch sizes rounded up where the data axis does not divide them).
  try:
    config = resolve.resolve(config, n)
  except ValueError as e:
    raise PreflightError(f"--config.{e} (on {target.name})") from e
  acc, crops = int(config.train.accumulate_steps), int(config.eval.num_crops)
  batch, eval_batch = int(config.train.batch_size), int(config.eval.batch_size)

  model, params, mask, tx, state = build(config, target.platform)
  cc, spec = model.clip_config, model.spec
  image_size = resolve.image_size(config, cc)
  train_step, eval_step, s_sh, p_sh, b_sh = step_lib.jit_steps(config, model, mask, tx, params, state, mesh)
  train_args = (_with_sharding(state, s_sh), _with_sharding(train_batch_shapes(batch, image_size),
                                                            {k: b_sh for k in train_batch_shapes(1, 1)}))
  eval_args = (_with_sharding(params, p_sh), _with_sharding(eval_batch_shapes(eval_batch, crops, image_size),
                                                            {"image": b_sh}))
  skipped = {"fits": True, "compile_s": 0.0, "skipped": True}
  train = compile_program(train_step, *train_args) if "train" in steps else dict(skipped)
  evaluation = compile_program(eval_step, *eval_args) if "eval" in steps else dict(skipped)

  flops_method = "cost_analysis"
  per_device = train.get("flops_per_device")
  if cc.scan_layers:  # XLA counts each scanned run of blocks once: not the step's FLOPs, so not reported as such
    per_device, flops_method = None, "none: clip.scan_layers (XLA counts a scanned block once; analytic count only)"
  if acc > 1 and train["fits"] and "train" in steps and not cc.scan_layers:
    # The accumulation loop's body is counted once: compile one micro-batch's step and scale it.
    micro_config = config.copy_and_resolve_references()
    with micro_config.unlocked():
      micro_config.train.batch_size = batch // acc
      micro_config.train.accumulate_steps = 1
    micro_step = step_lib.jit_steps(micro_config, model, mask, tx, params, state, mesh)[0]
    micro = compile_program(micro_step, train_args[0], _with_sharding(
        train_batch_shapes(batch // acc, image_size), {k: b_sh for k in train_batch_shapes(1, 1)}))
    micro_flops = micro.get("flops_per_device")
    per_device = micro_flops * acc if micro_flops is not None else None
    flops_method = f"cost_analysis of one micro-batch x accumulate_steps={acc} (the scan body is counted once)"

  text_rows = sum(len(rows) for _, rows in model.text_ids)
  pooled_only = spec.head != "text_query"
  backbone_trains = any(l == "trainable" for l in jax.tree.leaves(mask["clip"]))
  model_flops = flops_lib.step_flops(cc, spec, batch, text_rows, model.text_span, train=True,
                                     backbone_trains=backbone_trains, pooled_only=pooled_only)
  eval_flops = flops_lib.step_flops(cc, spec, eval_batch * crops, text_rows, model.text_span, train=False,
                                    pooled_only=pooled_only)
  # What the devices run, once per micro-batch: the class prompts split over "data" when it has more than one
  # device (padded to a multiple of it: step.jit_steps' text sharding), else on every device; each prompt row and
  # each image on the mesh.model devices of its data shard (rows and batch are split over "data" only). With a
  # backbone stored split (mesh.GatherOnce), rows and images are split over data x model instead: run once.
  gather = mesh_lib.gather_once(mesh, config.mesh.shard_backbone) is not None
  split = mesh.shape["data"] * (mesh.shape["model"] if gather else 1)
  rows_run = -(-text_rows // split) * split if split > 1 else text_rows
  images_run = -(-batch // (split * acc)) * split * acc / batch if gather else 1.0
  executed = ((model_flops["text"] * rows_run / text_rows * acc + model_flops["vision"] * images_run)
              * (1 if gather else mesh.shape["model"]))
  chip = target.chip
  hbm = chip.get("hbm_bytes")
  fits = train["fits"] and evaluation["fits"]
  if hbm is not None:
    fits = fits and all(p.get("peak_bytes") is not None and p["peak_bytes"] <= hbm
                        for p in (train, evaluation) if not p.get("skipped"))
  split_bytes = _split_bytes(params, p_sh)
  report: dict[str, Any] = {
      "topology": target.name, "platform": target.platform, "device_kind": target.device_kind, "devices": n,
      "hosts": target.hosts, "slices": target.num_slices, "mesh": dict(mesh.shape),
      "model": config.model.name, "clip": config.clip.name, "trainable": str(config.model.trainable),
      "dtype": cc.dtype, "remat": cc.remat, "scan_layers": cc.scan_layers,
      "shard_backbone": bool(config.mesh.shard_backbone), "gather_once": gather,
      "attention": _attention_path(cc), "vision_chunk": _vision_chunk(cc, batch), "global_batch": batch,
      "accumulate_steps": acc,
      "peak_bytes_per_device": train.get("peak_bytes"), "device_memory_bytes": hbm, "fits": fits,
      "state_bytes_per_device": _bytes_per_device(train_args[0]), "split_weight_bytes": split_bytes[0],
      "gathered_weight_bytes": split_bytes[1] if gather else None,
      "train": report_lib.public(train),
      "eval": {**report_lib.public(evaluation), "images_per_step": eval_batch * crops},
      "flops_per_device": per_device, "flops_per_step": per_device * n if per_device is not None else None,
      "flops_method": flops_method, "model_flops_per_step": model_flops["total"],
      "analytic_flops_executed": executed, "eval_model_flops_per_step": eval_flops["total"],
      "collectives": train.get("collectives"), "compile_s": round(train["compile_s"] + evaluation["compile_s"], 2),
  }
  if report["flops_per_step"] is not None:
    report["flops_vs_analytic"] = report["flops_per_step"] / executed
  elif train.get("fits") and "train" in steps and not cc.scan_layers:
    report["flops_method"] = f"none: the {target.platform} compiler gives no cost analysis here (analytic count only)"
  if chip.get("peak_flops"):
    step_s = model_flops["total"] / (n * chip["peak_flops"] * mfu)
    report.update(mfu=mfu, peak_flops_per_chip=chip["peak_flops"], step_s_at_mfu=step_s,
                  images_per_s_per_host=batch / step_s / target.hosts)
  if keep_programs:
    report["_programs"] = {"train": train, "eval": evaluation}
  return report


def _attention_path(cc) -> str:
  return attention_for(cc.target_platform())


def _vision_chunk(cc, batch: int) -> int:
  """Images per vision-tower pass of the train step (the whole batch unless a chunk loop runs; SigLIP: always)."""
  return chunking(batch, getattr(cc, "image_chunk", 0), cc.vision.hidden_size, cc.target_platform())[0]
