"""GPU benchmark in one go: MCPF train steps (ViT-B/16, ViT-L/14; bf16, fp32), the image encoder, and MaPLe in PyTorch.

  bash benchmarks/gpu.sh [--out benchmarks/results/gpu_h200.json] [--budget_s 410] [--rows NAME ...]
  bash benchmarks/gpu.sh --dry          # the same code paths on the CPU with a tiny CLIP (CI runs this)

Every row runs in a fresh worker process (this file with --worker), so its peak device memory
(`memory_stats()["peak_bytes_in_use"]` for JAX, `torch.cuda.max_memory_allocated()` for torch) is its own, a crash
or an out-of-memory loses that row only, and a row that outruns its time cap is killed. The JSON is rewritten after
every row (a run cut short still leaves what finished); rows are in priority order and a global budget skips the
rest. `--dry` runs every row in one worker on the CPU (tiny CLIP, batch 2, one step) and adds the parity row.

Rows (`ROWS`):
  jax train    `mcpf_jax.train.step.jit_steps`, the program train.py runs (one-device mesh, state donated), with
               configs/base.py's model, loss and prompts-only AdamW (`optim.make_optimizer` over `freeze.mask`: the
               CLIP backbone is frozen and gets no optimizer state and no weight gradient); variant mcpf
               (cross-attention fusion) or maple (`model.name=maple`: linear text->vision coupling).
  torch train  transformers' `CLIPModel` (random init from the same sizes), frozen, with MaPLe's deep prompts put in
               by forward hooks (`TorchMaple`): the same class prompts (5 quality + 9 scene + 11 distortion, the
               same token ids and end-of-text span), the same losses (`torch_batch_loss` is `losses.batch_loss`
               in torch), AdamW with global-norm clipping on the prompts and couplings only. bf16: autocast;
               fp32: TF32 matmuls allowed (what JAX does by default on the GPU, see below).
  jax encode   `CLIP.encode_image` (vision tower + projection) of float pixels, forward only.
  torch encode the same through transformers (model cast to bf16 / fp32 with TF32).
  matmul       the chip's measured matmul rates through XLA: bf16, f32 at the default precision, f32 "highest".
  parity       (--dry, or --parity) our `maple` model and `TorchMaple` on the same weights and prompts: loss,
               scores and the prompt gradient must agree (float32, CPU): the torch rows time the same function.

Per train/encode row: compile (lower + compile, timed), `--warmup` steps, then `--windows` windows of `--steps`
steps each, dispatched back to back and blocked at the window's end; img/s from the median window.
MFU = analytic model FLOPs (`mcpf_jax.model.flops.step_flops`: the matmuls and attention of what each
implementation computes, no frozen-weight gradients) / step time / the chip's dense peak for the arithmetic the
matmuls use: bf16 rows against dense bf16; fp32 rows against dense TF32, because JAX's default matmul precision
(`jax_default_matmul_precision` unset) computes float32 dots with TF32 tensor cores on Ampere and later GPUs (the
`matmul` row measures it: f32 "default" runs at the TF32 rate, "highest" at the IEEE fp32 rate), and the torch
fp32 rows are run with TF32 allowed to match. The peaks are the vendor's datasheet figures (`PEAKS`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))
DEFAULT_OUT = REPO / "benchmarks" / "results" / "gpu_h200.json"
GIB = 2 ** 30

# Dense (no sparsity) datasheet peaks, TFLOP/s, by a substring of the device name (JAX's device_kind, which is
# nvidia-smi's name). "tf32": TF32 tensor cores (float32 matmuls at JAX's default precision); "fp32": IEEE fp32.
PEAKS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.5, "tf32": 494.7, "fp32": 66.9},  # SXM; the same chip as the H100 SXM
    "H100 80GB HBM3": {"bf16": 989.5, "tf32": 494.7, "fp32": 66.9},  # SXM
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  framework: str  # "jax" | "torch"
  task: str  # "train" | "encode" | "matmul" | "parity"
  backbone: str = "vit-b-16"
  variant: str | None = None  # "mcpf" | "maple" (train rows)
  dtype: str = "bfloat16"
  batch_key: str = "b16"  # which --*_batch flag sizes it
  cap_s: float = 90.0  # the worker is killed after this long (GPU; the budget left may cut it shorter): a runaway
  # compile cannot eat the whole budget
  min_s: float = 20.0  # not started with less budget left (GPU): a cheaper row further down may still fit


ROWS: tuple[Row, ...] = (  # in priority order: what the budget cuts is at the end
    Row("jax_train_b16_bf16_mcpf", "jax", "train", "vit-b-16", "mcpf", "bfloat16", "b16", 180, 50),
    Row("torch_train_b16_bf16_maple", "torch", "train", "vit-b-16", "maple", "bfloat16", "b16", 90, 25),
    Row("jax_train_b16_bf16_maple", "jax", "train", "vit-b-16", "maple", "bfloat16", "b16", 150, 45),
    Row("jax_train_b16_fp32_mcpf", "jax", "train", "vit-b-16", "mcpf", "float32", "b16", 180, 50),
    Row("torch_train_b16_fp32_maple", "torch", "train", "vit-b-16", "maple", "float32", "b16", 90, 25),
    Row("jax_encode_b16_bf16", "jax", "encode", "vit-b-16", None, "bfloat16", "encode", 90, 25),
    Row("jax_train_l14_bf16_mcpf", "jax", "train", "vit-l-14", "mcpf", "bfloat16", "l14", 240, 70),
    Row("jax_train_l14_fp32_mcpf", "jax", "train", "vit-l-14", "mcpf", "float32", "l14", 240, 70),
    Row("jax_train_b16_fp32_maple", "jax", "train", "vit-b-16", "maple", "float32", "b16", 150, 45),
    Row("matmul_peak", "jax", "matmul", cap_s=60, min_s=15),
    Row("jax_encode_b16_fp32", "jax", "encode", "vit-b-16", None, "float32", "encode", 90, 25),
    Row("torch_encode_b16_bf16", "torch", "encode", "vit-b-16", None, "bfloat16", "encode", 60, 20),
    Row("torch_encode_b16_fp32", "torch", "encode", "vit-b-16", None, "float32", "encode", 60, 20),
)
PARITY = Row("parity_maple_jax_vs_torch", "both", "parity", "vit-b-16", "maple", "float32", "b16", 60)
# --dry: one row of each task x framework (the other rows differ from these by sizes, dtype or config.model.name
# only; the parity row runs the maple variant in both frameworks), in one worker process: on a CPU even a tiny train
# step takes seconds to compile.
DRY_ROWS = ("jax_train_b16_bf16_mcpf", "torch_train_b16_bf16_maple", "jax_encode_b16_fp32", "matmul_peak",
            "torch_encode_b16_bf16", PARITY.name)
BY_NAME = {r.name: r for r in (*ROWS, PARITY)}

# What the JAX and torch train rows share and where they differ (written into the JSON as it is).
SAME = [
    "backbone sizes (the preset's config.json dict -> transformers.CLIPConfig), frozen, random weights",
    "prompt placement: 8 text prompts after SOS replacing token embeddings (layer 0) and hidden states "
    "(layers 1..J-1); 8 visual prompts appended after the patch tokens (layer 0) and replacing them (1..J-1); J=9",
    "maple coupling: visual prompts of layer j = Linear_j(text prompts of layer j), no own visual parameters",
    "class prompts: the same 25 token-id rows (5 quality + 9 scene + 11 distortion), cut to the same end-of-text "
    "span; pooling at the first end-of-text token",
    "loss: fidelity ranking + L1 + level cross-entropy + 0.1 x (scene + distortion cross-entropy), same weights",
    "optimizer: AdamW (b1 0.9, b2 0.999, weight decay 1e-4) after global-norm clipping at 1.0, trainable prompts "
    "and couplings only; no gradient of any backbone weight is computed",
    "input: the same uint8 NHWC batch on the device, normalised inside the step",
]
DIFFERENT = [
    "mcpf rows use MCPF's cross-attention fusion (extra fusion module, own visual prompts); the maple rows are the "
    "like-for-like comparison with torch",
    "attention: our model calls jax.nn.dot_product_attention with no implementation, which is XLA's own "
    "(softmax + two batched matmuls, no cuDNN flash kernel); torch runs SDPA (flash / memory-efficient kernels)",
    "our vision tower's last block updates the CLS token only (the pooled feature is the same); transformers runs "
    "it on every token (counted in its FLOPs, so its MFU is of what it computes)",
    "bf16: ours computes in bf16 with float32 parameters, f32-accumulating matmuls and f32 LayerNorm/softmax; "
    "torch uses autocast (bf16 matmuls/convs, f32 LayerNorm/softmax)",
    "learning rate: ours follows the warm-up + cosine schedule (optax); torch uses a constant rate (no cost)",
    "ours is one XLA program per step; torch is eager (no torch.compile, no CUDA graphs), as MaPLe runs",
    "encode rows: torch's bf16 model is cast to bf16 (bf16 weights); ours keeps float32 weights and computes in bf16",
]


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers (both frameworks).


def tiny_clip_config(dtype: str):
  from mcpf_jax.clip.tiny import tiny_config  # pylint: disable=g-import-not-at-top
  return tiny_config(width=32, layers=2, heads=2, image_size=32, patch_size=8, embed_dim=32, dtype=dtype)


def clip_config(row: Row, dry: bool, dtype: str | None = None):
  from mcpf_jax import clip  # pylint: disable=g-import-not-at-top
  dtype = dtype or row.dtype
  return tiny_clip_config(dtype) if dry else clip.preset(row.backbone, dtype=dtype)


def train_config(row: Row, batch: int):
  """configs/base.py with the row's variant, dtype and batch; the learning-rate schedule resolved."""
  from configs import base  # pylint: disable=g-import-not-at-top
  config = base.get_config()
  config.model.name = row.variant
  config.clip.dtype = row.dtype
  config.train.batch_size = batch
  config.optim.total_steps = 1000  # train.py resolves it from the dataset size; any value costs the same
  return config


def synthetic_batch(batch: int, image_size: int, seed: int = 0) -> dict[str, Any]:
  """A train batch with the keys and dtypes of the training pipeline (`mcpf_jax.aot.train_batch_shapes`)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from mcpf_jax import aot  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  mos01 = rng.uniform(size=batch).astype(np.float32)
  scene = np.zeros((batch, 9), np.float32)
  scene[np.arange(batch), rng.integers(0, 9, batch)] = 1
  values = {"image": rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8),
            "mos": 100 * mos01, "mos01": mos01, "mos_std01": np.full((batch,), 0.05, np.float32),
            "level": np.minimum((mos01 * 5).astype(np.int32), 4), "scene": scene,
            "has_scene": np.ones((batch,), np.float32), "distortion": rng.integers(0, 11, batch).astype(np.int32),
            "has_distortion": np.ones((batch,), np.float32), "index": np.arange(batch, dtype=np.int32)}
  shapes = aot.train_batch_shapes(batch, image_size)
  if set(shapes) != set(values):
    raise KeyError(f"the train batch has keys {sorted(shapes)} (mcpf_jax.aot.train_batch_shapes); this benchmark "
                   f"makes {sorted(values)}: update synthetic_batch")
  for k, s in shapes.items():
    values[k] = np.asarray(values[k]).astype(s.dtype)
    if values[k].shape != s.shape:
      raise ValueError(f"synthetic batch {k!r}: shape {values[k].shape}, the pipeline's is {s.shape}")
  return values


def peak_for(device_kind: str, arithmetic: str, dry: bool) -> tuple[float | None, str]:
  """(peak FLOP/s, what it is) of `arithmetic` ("bf16" | "tf32" | "fp32") on this device."""
  if dry:
    return 1e11, "nominal 0.1 TFLOP/s (dry run on the CPU: not a peak, only the arithmetic is exercised)"
  for key, peaks in PEAKS.items():
    if key in device_kind:
      return peaks[arithmetic] * 1e12, f"{key} dense {arithmetic} datasheet, {peaks[arithmetic]} TFLOP/s"
  return None, f"no datasheet peak known for {device_kind!r}"


def time_windows(run: Callable[[], Any], sync: Callable[[Any], Any], warmup: int, windows: int,
                 steps: int) -> tuple[float, list[float], Any]:
  """(first call s, [seconds per window of `steps` calls], last output). Each window blocks once at its end."""
  start = time.perf_counter()
  out = sync(run())
  first = time.perf_counter() - start
  for _ in range(max(warmup - 1, 0)):
    out = sync(run())
  times = []
  for _ in range(windows):
    start = time.perf_counter()
    for _ in range(steps):
      out = run()
    out = sync(out)
    times.append(time.perf_counter() - start)
  return first, times, out


def rate_fields(batch: int, window_s: list[float], steps: int, flops: float, peak: tuple[float | None, str]
                ) -> dict[str, Any]:
  step_s = statistics.median(window_s) / steps
  achieved = flops / step_s
  return {"images_per_s": batch / step_s, "step_ms": 1e3 * step_s,
          "window_ms_per_step": [round(1e3 * t / steps, 3) for t in window_s],
          "model_gflop_per_step": flops / 1e9, "achieved_tflops": achieved / 1e12,
          "mfu": achieved / peak[0] if peak[0] else None, "mfu_peak": peak[1]}


# ---------------------------------------------------------------------------------------------------------------
# JAX rows.


def _jax_device_fields() -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  d = jax.devices()[0]
  stats = d.memory_stats() if hasattr(d, "memory_stats") else None
  out = {"device": getattr(d, "device_kind", str(d)), "platform": d.platform,
         "peak_bytes_in_use": None, "peak_gib": None, "bytes_limit": None,
         "memory_note": None}
  if stats:
    out["peak_bytes_in_use"] = int(stats.get("peak_bytes_in_use", 0))
    out["peak_gib"] = round(out["peak_bytes_in_use"] / GIB, 2)
    out["bytes_limit"] = stats.get("bytes_limit")
  else:
    out["memory_note"] = f"{d.platform}: memory_stats() is None (no device memory statistic)"
  return out


def _xla_plan(compiled) -> dict[str, Any]:
  out: dict[str, Any] = {"xla_plan_gib": None, "xla_gflop": None}
  mem = compiled.memory_analysis()
  if mem is not None:
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             - mem.alias_size_in_bytes)
    out["xla_plan_gib"] = round(total / GIB, 2)
    out["xla_temp_gib"] = round(mem.temp_size_in_bytes / GIB, 2)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if cost and "flops" in cost:
    out["xla_gflop"] = float(cost["flops"]) / 1e9
  return out


def default_matmul_precision(jax) -> str | None:
  """jax_default_matmul_precision (None: unset, i.e. each backend's default: TF32 for float32 on NVIDIA GPUs)."""
  try:
    return jax.config.jax_default_matmul_precision
  except AttributeError:  # how a later jax may spell it
    return os.environ.get("JAX_DEFAULT_MATMUL_PRECISION")


def _arithmetic(dtype: str) -> str:
  """The matmul arithmetic of a compute dtype under JAX's default settings (the torch rows match them on the GPU).

  float32 at the default precision: TF32 tensor cores on an NVIDIA GPU, full float32 on the CPU.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if dtype == "bfloat16":
    return "bf16"
  precision = default_matmul_precision(jax)
  if jax.default_backend() == "gpu" and precision in (None, "default", "tensorfloat32", "TF32_TF32_F32"):
    return "tf32"
  return "fp32"


def jax_train_row(row: Row, args, batch: int, emit: Callable[[dict], None]) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top

  from mcpf_jax import clip  # pylint: disable=g-import-not-at-top
  from mcpf_jax import model as iqa
  from mcpf_jax.clip.tokenizer import Tokenizer
  from mcpf_jax.model import flops, freeze
  from mcpf_jax.train import mesh as mesh_lib
  from mcpf_jax.train import optim
  from mcpf_jax.train import step as step_lib

  t0 = time.perf_counter()
  config = train_config(row, batch)
  cc = clip_config(row, args.dry)
  params = jax.device_put(clip.init_random(cc, seed=0))
  bundle = clip.Bundle(model=clip.CLIP(cc), params=params, tokenizer=Tokenizer.default(), config=cc,
                       source=f"init_random({row.backbone if not args.dry else 'tiny'}, seed=0)", fingerprint="-")
  model, params = iqa.build(config.model, bundle, jax.random.key(0))
  mask = freeze.mask(params, config.model.trainable)
  tx = optim.make_optimizer(config.optim, mask)
  mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.model)
  state = step_lib.init_state(params, tx)
  train_step, _, s_sh, _, b_sh = step_lib.jit_steps(config, model, mask, tx, params, state, mesh)
  state = jax.device_put(state, s_sh)
  data = jax.device_put(synthetic_batch(batch, cc.vision.image_size), b_sh)
  jax.block_until_ready((state, data))
  setup_s = time.perf_counter() - t0
  emit({"stage": "setup done", "setup_s": setup_s})

  lower_s, lowered = _timed(lambda: train_step.lower(state, data))
  compile_s, compiled = _timed(lowered.compile)
  emit({"stage": "compiled", "setup_s": setup_s, "lower_s": lower_s, "compile_s": compile_s})
  box = {"state": state}

  def run():
    box["state"], metrics = compiled(box["state"], data)
    return metrics

  first_s, window_s, metrics = time_windows(run, jax.block_until_ready, args.warmup, args.windows, args.steps)
  if not bool(metrics["finite"]):
    raise FloatingPointError(f"non-finite loss or gradient: {jax.device_get(metrics)}")
  text_rows = sum(len(r) for _, r in model.text_ids)
  model_flops = flops.step_flops(model.clip_config, model.spec, batch, text_rows, model.text_span, train=True,
                                 backbone_trains=False, pooled_only=True)["total"]
  arithmetic = _arithmetic(row.dtype)
  out = {"batch": batch, "setup_s": setup_s, "lower_s": lower_s, "compile_s": compile_s, "first_step_s": first_s,
         **rate_fields(batch, window_s, args.steps, model_flops, peak_for(_jax_device_fields()["device"],
                                                                          arithmetic, args.dry)),
         "matmul_arithmetic": arithmetic, "loss": float(metrics["loss"]),
         "trainable_params": freeze.count(params, mask), "total_params": freeze.count(params),
         "backbone_params": freeze.count(params["clip"]),
         "text_rows": text_rows, "text_tokens": model.text_span,
         "vision_tokens": 1 + cc.vision.num_patches + model.spec.num_vision_prompts,
         **_xla_plan(compiled), **_jax_device_fields()}
  return out


def jax_encode_row(row: Row, args, batch: int, emit: Callable[[dict], None]) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np

  from mcpf_jax import clip  # pylint: disable=g-import-not-at-top
  from mcpf_jax.model import flops

  t0 = time.perf_counter()
  cc = clip_config(row, args.dry)
  params = jax.device_put(clip.init_random(cc, seed=0))
  model = clip.CLIP(cc)
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_image"))
  size = cc.vision.image_size
  pixels = jax.device_put(np.random.default_rng(0).standard_normal((batch, size, size, 3), dtype=np.float32))
  jax.block_until_ready((params, pixels))
  setup_s = time.perf_counter() - t0
  lower_s, lowered = _timed(lambda: encode.lower(params, pixels))
  compile_s, compiled = _timed(lowered.compile)
  emit({"stage": "compiled", "setup_s": setup_s, "lower_s": lower_s, "compile_s": compile_s})
  first_s, window_s, feats = time_windows(lambda: compiled(params, pixels), jax.block_until_ready, args.warmup,
                                          args.windows, args.steps)
  if not bool(np.isfinite(np.asarray(feats, np.float32)).all()):
    raise FloatingPointError("non-finite image features")
  no_prompts = argparse.Namespace(vision_depth=0, num_vision_prompts=0)
  model_flops = flops.step_flops(cc, no_prompts, batch, 0, 1, train=False, pooled_only=True)["vision"]
  arithmetic = _arithmetic(row.dtype)
  return {"batch": batch, "setup_s": setup_s, "lower_s": lower_s, "compile_s": compile_s, "first_step_s": first_s,
          **rate_fields(batch, window_s, args.steps, model_flops, peak_for(_jax_device_fields()["device"],
                                                                           arithmetic, args.dry)),
          "matmul_arithmetic": arithmetic, "vision_tokens": 1 + cc.vision.num_patches,
          **_xla_plan(compiled), **_jax_device_fields()}


def matmul_row(row: Row, args, batch: int, emit: Callable[[dict], None]) -> dict[str, Any]:
  """n x n @ n x n through XLA: bf16, f32 at the default precision, f32 at "highest" (TFLOP/s each)."""
  del row, batch, emit
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  n = 256 if args.dry else 8192
  a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
  cases = {"bf16": (jnp.bfloat16, None), "f32_default": (jnp.float32, None), "f32_highest": (jnp.float32, "highest")}
  out: dict[str, Any] = {"n": n}
  for name, (dtype, precision) in cases.items():
    x, y = a.astype(dtype), b.astype(dtype)
    fn = jax.jit(lambda x, y, p=precision: jnp.matmul(x, y, precision=p))
    _, window_s, _ = time_windows(lambda: fn(x, y), jax.block_until_ready, 2, 3, 10)
    out[f"{name}_tflops"] = 2 * n ** 3 / (statistics.median(window_s) / 10) / 1e12
  out["f32_default_over_highest"] = out["f32_default_tflops"] / out["f32_highest_tflops"]
  out["default_matmul_precision"] = default_matmul_precision(jax)
  out.update(_jax_device_fields())
  return out


# ---------------------------------------------------------------------------------------------------------------
# torch rows: transformers' CLIPModel with MaPLe's prompts.


def torch_batch_loss(out: dict[str, Any], batch: dict[str, Any], weights: dict[str, float]):
  """`mcpf_jax.model.losses.batch_loss` in torch (no "weight" mask: every image is valid)."""
  import torch  # pylint: disable=g-import-not-at-top
  sqrt2 = math.sqrt(2.0)
  cdf = lambda x: 0.5 * (1.0 + torch.erf(x / sqrt2))

  def masked_mean(values, weight):
    return torch.sum(values * weight) / torch.clamp(torch.sum(weight), min=1.0)

  def cross_entropy(logits, labels, weight):
    logp = torch.log_softmax(logits.float(), dim=-1)
    labels = labels.long().clamp(0, logits.shape[-1] - 1)
    return masked_mean(-logp.gather(-1, labels[:, None])[:, 0], weight)

  score, mos, std = out["score"], batch["mos01"], batch["mos_std01"]
  n = score.shape[0]
  ds, dm = score[:, None] - score[None, :], mos[:, None] - mos[None, :]
  p_hat = cdf(ds / sqrt2)
  hard = torch.where(dm > 0, 1.0, torch.where(dm < 0, 0.0, 0.5))
  std0 = torch.nan_to_num(std, nan=0.0)
  known = (std0[:, None] > 0) & (std0[None, :] > 0)
  var = std[:, None] ** 2 + std[None, :] ** 2
  p = torch.where(known, cdf(dm / torch.sqrt(torch.where(known, var, torch.ones_like(var)))), hard)
  eps = 1e-8
  pair = 1.0 - torch.sqrt(p * p_hat + eps) - torch.sqrt((1.0 - p) * (1.0 - p_hat) + eps)
  pair_w = 1.0 - torch.eye(n, dtype=score.dtype, device=score.device)
  terms = {"rank": torch.sum(pair * pair_w) / torch.clamp(torch.sum(pair_w), min=1.0)}
  ones = torch.ones_like(score)
  terms["l1"] = masked_mean(torch.abs(out["score01"] - mos), ones)
  terms["cls"] = cross_entropy(out["quality_logits"], batch["level"], ones)
  logp = torch.log_softmax(out["scene_logits"].float(), dim=-1)
  target = batch["scene"].float()
  count = target.sum(-1)
  nll = -torch.sum(target / torch.clamp(count, min=1.0)[:, None] * logp, dim=-1)
  terms["scene"] = masked_mean(nll, batch["has_scene"] * (count > 0))
  terms["distortion"] = cross_entropy(out["distortion_logits"], batch["distortion"], batch["has_distortion"])
  total = (weights["rank"] * terms["rank"] + weights["l1"] * terms["l1"] + weights["cls"] * terms["cls"]
           + weights["aux"] * (terms["scene"] + terms["distortion"]))
  return total, terms


def make_torch_maple(clip_model, ids, set_sizes: dict[str, int], depth: int, num_prompts: int):
  """MaPLe around a frozen transformers CLIPModel: learnable deep text prompts, visual prompts coupled linearly.

  `ids` [rows, span] int64: the class prompts' token ids (placeholders at 1..n). Hooks (not a copy of the towers):
  text layer 0 replaces the token embeddings at 1..n (before the position embedding is added); text layer j in
  1..J-1 replaces the hidden states at 1..n at its input; vision layer 0 appends the prompts after the patch
  tokens (after the position embedding, before pre_layrnorm); vision layer j replaces those last n tokens.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  text_width = clip_model.config.text_config.hidden_size
  vision_width = clip_model.config.vision_config.hidden_size

  class TorchMaple(nn.Module):
    def __init__(self):
      super().__init__()
      self.clip = clip_model.requires_grad_(False).eval()
      self.text_prompts = nn.Parameter(0.02 * torch.randn(depth, num_prompts, text_width))
      self.couple = nn.ModuleList([nn.Linear(text_width, vision_width) for _ in range(depth)])
      self.register_buffer("ids", ids.to(next(clip_model.parameters()).device), persistent=False)
      self.set_sizes = dict(set_sizes)
      self.levels = None
      self._text: list[torch.Tensor] = []
      self._vision: list[torch.Tensor] = []
      text, vision = self.clip.text_model, self.clip.vision_model
      text.embeddings.token_embedding.register_forward_hook(self._text_first)
      vision.embeddings.register_forward_hook(self._vision_first)
      for j in range(1, depth):
        text.encoder.layers[j].register_forward_pre_hook(self._deep(j, "text"), with_kwargs=True)
        vision.encoder.layers[j].register_forward_pre_hook(self._deep(j, "vision"), with_kwargs=True)

    def _text_first(self, module, inputs, out):
      del module, inputs
      p = self._text[0].to(out.dtype).expand(out.shape[0], -1, -1)
      return torch.cat([out[:, :1], p, out[:, 1 + num_prompts:]], dim=1)

    def _vision_first(self, module, inputs, out):
      del module, inputs
      return torch.cat([out, self._vision[0].to(out.dtype).expand(out.shape[0], -1, -1)], dim=1)

    def _deep(self, j: int, tower: str):
      def hook(module, args, kwargs):
        del module
        h = args[0] if args else kwargs["hidden_states"]
        if tower == "text":
          p = self._text[j].to(h.dtype).expand(h.shape[0], -1, -1)
          h = torch.cat([h[:, :1], p, h[:, 1 + num_prompts:]], dim=1)
        else:
          p = self._vision[j].to(h.dtype).expand(h.shape[0], -1, -1)
          h = torch.cat([h[:, :h.shape[1] - num_prompts], p], dim=1)
        if args:
          return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}
      return hook

    def forward(self, pixels):
      """pixels float NCHW, CLIP-normalised -> the IQA outputs of `IQAModel` (cosine head)."""
      self._text = list(self.text_prompts)
      self._vision = [self.couple[j](self.text_prompts[j]) for j in range(depth)]
      text = self.clip.text_projection(self.clip.text_model(input_ids=self.ids).pooler_output)
      image = self.clip.visual_projection(self.clip.vision_model(pixel_values=pixels).pooler_output)
      with torch.autocast(pixels.device.type, enabled=False):  # the head in float32, as ours
        return self._head(text.float(), image.float())

    def _head(self, text, image):
      text = text / text.norm(dim=-1, keepdim=True)
      image = image / image.norm(dim=-1, keepdim=True)
      scale = self.clip.logit_scale.float().exp()
      out, start = {}, 0
      for name, size in self.set_sizes.items():
        out[f"{name}_logits"] = scale * image @ text[start:start + size].T
        start += size
      logits = out["quality_logits"]
      probs = torch.softmax(logits, dim=-1)
      levels = torch.arange(1, logits.shape[-1] + 1, dtype=torch.float32, device=logits.device)
      out["score"] = probs @ levels
      out["score01"] = (out["score"] - 1.0) / (logits.shape[-1] - 1)
      return out

  return TorchMaple()


def _torch_setup(row: Row, args):
  """(torch, transformers, device, our CLIPConfig, HF CLIPConfig); TF32 allowed for fp32 rows (JAX's default)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  device = torch.device("cpu" if args.dry else "cuda")
  if not args.dry and not torch.cuda.is_available():
    raise RuntimeError("torch sees no CUDA device (torch.cuda.is_available() is False)")
  torch.backends.cuda.matmul.allow_tf32 = True
  torch.backends.cudnn.allow_tf32 = True
  cc = clip_config(row, args.dry, dtype="float32")
  hf = transformers.CLIPConfig.from_dict(cc.to_hf(), attn_implementation="sdpa")
  return torch, transformers, device, cc, hf


def _torch_device_fields(torch, device) -> dict[str, Any]:
  if device.type != "cuda":
    return {"device": platform.processor() or "cpu", "platform": "cpu", "peak_bytes_in_use": None,
            "peak_gib": None, "bytes_limit": None, "memory_note": "cpu: no torch.cuda memory statistic"}
  peak = torch.cuda.max_memory_allocated(device)
  return {"device": torch.cuda.get_device_name(device), "platform": "gpu", "peak_bytes_in_use": int(peak),
          "peak_gib": round(peak / GIB, 2), "bytes_limit": int(torch.cuda.get_device_properties(device).total_memory),
          "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / GIB, 2), "memory_note": None}


def _class_ids(row: Row, cc, config):
  """The class prompts' ids cut to the end-of-text span, their set sizes and the spec, as our model builds them."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from mcpf_jax.clip.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  from mcpf_jax.model.iqa import IQAModel, ModelSpec, class_token_ids
  spec = ModelSpec.from_config(config.model, num_layers=min(cc.text.num_hidden_layers, cc.vision.num_hidden_layers))
  ids = class_token_ids(spec, Tokenizer.default())
  model = IQAModel(cc, spec, tuple((k, tuple(tuple(int(t) for t in r) for r in v)) for k, v in ids.items()))
  rows = np.concatenate([v for v in ids.values()], axis=0)[:, :model.text_span]
  return rows, {k: len(v) for k, v in ids.items()}, spec, model


def _torch_inputs(torch, device, data: dict[str, Any]) -> dict[str, Any]:
  return {k: torch.from_numpy(v).to(device) for k, v in data.items()}


def _torch_normalize(torch, images):
  from mcpf_jax.clip.preprocess import CLIP_MEAN, CLIP_STD  # pylint: disable=g-import-not-at-top
  mean = torch.tensor(CLIP_MEAN, device=images.device)
  std = torch.tensor(CLIP_STD, device=images.device)
  return ((images.float() / 255.0 - mean) / std).permute(0, 3, 1, 2)


def torch_train_row(row: Row, args, batch: int, emit: Callable[[dict], None]) -> dict[str, Any]:
  from mcpf_jax.model import flops  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  torch, transformers, device, cc, hf = _torch_setup(row, args)
  config = train_config(row, batch)
  ids, set_sizes, spec, _ = _class_ids(row, cc, config)
  torch.manual_seed(0)
  with device:
    clip_model = transformers.CLIPModel(hf)
    model = make_torch_maple(clip_model, torch.from_numpy(ids).long(), set_sizes, spec.text_depth,
                             spec.num_text_prompts)
  trainable = [p for p in model.parameters() if p.requires_grad]
  oc = config.optim
  opt = torch.optim.AdamW(trainable, lr=oc.lr, betas=(oc.b1, oc.b2), weight_decay=oc.weight_decay,
                          fused=device.type == "cuda")
  weights = {k: float(config.loss[k]) for k in ("rank", "l1", "cls", "aux")}
  data = _torch_inputs(torch, device, synthetic_batch(batch, cc.vision.image_size))
  bf16 = row.dtype == "bfloat16"

  def run():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
      out = model(_torch_normalize(torch, data["image"]))
    loss, _ = torch_batch_loss(out, data, weights)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, oc.grad_clip_norm)
    opt.step()
    return loss

  sync = (lambda x: (torch.cuda.synchronize(device), x)[1]) if device.type == "cuda" else (lambda x: x)
  if device.type == "cuda":
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
  setup_s = time.perf_counter() - t0
  emit({"stage": "setup done", "setup_s": setup_s})
  first_s, window_s, loss = time_windows(run, sync, args.warmup, args.windows, args.steps)
  if not bool(torch.isfinite(loss)):
    raise FloatingPointError(f"non-finite torch loss {float(loss)}")
  model_flops = flops.step_flops(cc, spec, batch, int(ids.shape[0]), int(ids.shape[1]), train=True,
                                 backbone_trains=False, pooled_only=False)["total"]
  arithmetic = "bf16" if bf16 else ("tf32" if device.type == "cuda" else "fp32")
  dev = _torch_device_fields(torch, device)
  return {"batch": batch, "setup_s": setup_s, "lower_s": None, "compile_s": None, "first_step_s": first_s,
          **rate_fields(batch, window_s, args.steps, model_flops, peak_for(dev["device"], arithmetic, args.dry)),
          "matmul_arithmetic": arithmetic, "loss": float(loss.detach()),
          "trainable_params": sum(p.numel() for p in trainable),
          "total_params": sum(p.numel() for p in model.parameters()),
          "backbone_params": sum(p.numel() for p in clip_model.parameters()), "text_rows": int(ids.shape[0]),
          "text_tokens": int(ids.shape[1]), "vision_tokens": 1 + cc.vision.num_patches + spec.num_text_prompts,
          "attn_implementation": clip_model.config._attn_implementation,  # pylint: disable=protected-access
          "autocast": "bfloat16" if bf16 else None, **dev}


def torch_encode_row(row: Row, args, batch: int, emit: Callable[[dict], None]) -> dict[str, Any]:
  import numpy as np  # pylint: disable=g-import-not-at-top

  from mcpf_jax.model import flops  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  torch, transformers, device, cc, hf = _torch_setup(row, args)
  torch.manual_seed(0)
  with device:
    clip_model = transformers.CLIPModel(hf).eval()
  if row.dtype == "bfloat16":
    clip_model = clip_model.to(torch.bfloat16)
  size = cc.vision.image_size
  pixels = torch.from_numpy(np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32))
  pixels = pixels.to(device=device, dtype=next(clip_model.parameters()).dtype)

  def run():
    with torch.inference_mode():
      return clip_model.visual_projection(clip_model.vision_model(pixel_values=pixels).pooler_output)

  sync = (lambda x: (torch.cuda.synchronize(device), x)[1]) if device.type == "cuda" else (lambda x: x)
  if device.type == "cuda":
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
  setup_s = time.perf_counter() - t0
  emit({"stage": "setup done", "setup_s": setup_s})
  first_s, window_s, feats = time_windows(run, sync, args.warmup, args.windows, args.steps)
  if not bool(torch.isfinite(feats.float()).all()):
    raise FloatingPointError("non-finite torch image features")
  no_prompts = argparse.Namespace(vision_depth=0, num_vision_prompts=0)
  model_flops = flops.step_flops(cc, no_prompts, batch, 0, 1, train=False, pooled_only=False)["vision"]
  arithmetic = "bf16" if row.dtype == "bfloat16" else ("tf32" if device.type == "cuda" else "fp32")
  dev = _torch_device_fields(torch, device)
  return {"batch": batch, "setup_s": setup_s, "lower_s": None, "compile_s": None, "first_step_s": first_s,
          **rate_fields(batch, window_s, args.steps, model_flops, peak_for(dev["device"], arithmetic, args.dry)),
          "matmul_arithmetic": arithmetic, "vision_tokens": 1 + cc.vision.num_patches,
          "attn_implementation": clip_model.config._attn_implementation, **dev}  # pylint: disable=protected-access


def parity_row(row: Row, args, batch: int, emit: Callable[[dict], None]) -> dict[str, Any]:
  """Our `maple` model and `TorchMaple` on the same weights, prompts and batch: loss, scores, prompt gradient.

  float32 at full precision in both (JAX "highest", torch without TF32), so the difference is rounding only.
  """
  del emit
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np
  import torch
  import transformers

  from mcpf_jax import clip  # pylint: disable=g-import-not-at-top
  from mcpf_jax import model as iqa
  from mcpf_jax.clip import preprocess
  from mcpf_jax.clip.checkpoint import to_torch_state_dict
  from mcpf_jax.clip.tokenizer import Tokenizer
  from mcpf_jax.model import losses

  batch = min(batch, 4)
  config = train_config(row, batch)
  cc = clip_config(row, args.dry, dtype="float32")
  clip_params = clip.init_random(cc, seed=0)
  bundle = clip.Bundle(model=clip.CLIP(cc), params=clip_params, tokenizer=Tokenizer.default(), config=cc,
                       source="init_random", fingerprint="-")
  model, params = iqa.build(config.model, bundle, jax.random.key(1))
  weights = {k: float(config.loss[k]) for k in ("rank", "l1", "cls", "aux")}
  data = synthetic_batch(batch, cc.vision.image_size, seed=3)

  def ours(prompts):
    p = dict(params, text_prompts_all=prompts)
    out = model.apply({"params": p}, preprocess.normalize(data["image"]))
    return losses.batch_loss(out, data, weights)[0], out

  with jax.default_matmul_precision("highest"):
    (loss_j, out_j), grad_j = jax.jit(jax.value_and_grad(ours, has_aux=True))(params["text_prompts_all"])

  device = torch.device("cpu")
  torch.backends.cuda.matmul.allow_tf32 = False
  hf = transformers.CLIPConfig.from_dict(cc.to_hf(), attn_implementation="sdpa")
  clip_model = transformers.CLIPModel(hf)
  missing, unexpected = clip_model.load_state_dict(
      {k: torch.from_numpy(np.array(v)) for k, v in to_torch_state_dict(clip_params).items()}, strict=False)
  if missing or unexpected:
    raise KeyError(f"torch state dict: missing {missing}, unexpected {unexpected}")
  ids, set_sizes, spec, _ = _class_ids(row, cc, config)
  tm = make_torch_maple(clip_model, torch.from_numpy(ids).long(), set_sizes, spec.text_depth, spec.num_text_prompts)
  with torch.no_grad():
    tm.text_prompts.copy_(torch.from_numpy(np.array(params["text_prompts_all"])))
    for j, layer in enumerate(tm.couple):
      fused = params["fusion"][f"linear_{j}"]
      layer.weight.copy_(torch.from_numpy(np.array(fused["kernel"]).T))
      layer.bias.copy_(torch.from_numpy(np.array(fused["bias"])))
  tdata = _torch_inputs(torch, device, data)
  out_t = tm(_torch_normalize(torch, tdata["image"]))
  loss_t, _ = torch_batch_loss(out_t, tdata, weights)
  loss_t.backward()
  grad_t = tm.text_prompts.grad.numpy()
  grad_j = np.asarray(grad_j)
  diff = lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
  return {"batch": batch, "device": "cpu", "platform": "cpu",
          "loss_jax": float(loss_j), "loss_torch": float(loss_t.detach()),
          "loss_abs_diff": abs(float(loss_j) - float(loss_t.detach())),
          "score_max_abs_diff": diff(out_j["score"], out_t["score"].detach().numpy()),
          "quality_logits_max_abs_diff": diff(out_j["quality_logits"], out_t["quality_logits"].detach().numpy()),
          "prompt_grad_max_abs_diff": diff(grad_j, grad_t), "prompt_grad_max_abs": float(np.max(np.abs(grad_j))),
          "prompt_grad_relative_diff": diff(grad_j, grad_t) / max(float(np.max(np.abs(grad_j))), 1e-30)}


TASKS = {("jax", "train"): jax_train_row, ("jax", "encode"): jax_encode_row, ("jax", "matmul"): matmul_row,
         ("torch", "train"): torch_train_row, ("torch", "encode"): torch_encode_row, ("both", "parity"): parity_row}


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def versions() -> dict[str, str | None]:
  out = {}
  for name in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers"):
    mod = sys.modules.get(name)
    out[name] = getattr(mod, "__version__", None) if mod else None
  torch = sys.modules.get("torch")
  if torch is not None:
    out["torch_cuda"] = torch.version.cuda
  return out


def batch_for(row: Row, args) -> int:
  if args.dry:
    return 2
  return {"b16": args.b16_batch, "l14": args.l14_batch, "encode": args.encode_batch}[row.batch_key]


def _require_jax_gpu() -> None:
  """A JAX that fell back to the CPU (a missing or broken CUDA plugin) would spend the row's whole cap: fail now."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != "gpu":
    raise RuntimeError(f"JAX runs on {jax.default_backend()!r}, not a GPU (devices {jax.devices()}; JAX_PLATFORMS="
                       f"{os.environ.get('JAX_PLATFORMS')!r}): is jax's CUDA plugin installed and working?")


def worker(args) -> int:
  """Runs `args.worker` rows in this process; appends one JSON line per record to `args.result_file`."""
  if args.dry:
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_platforms", "cpu")
  with open(args.result_file, "a", encoding="utf-8") as sink:
    for name in args.worker:
      row = BY_NAME[name]

      def emit(record: dict[str, Any], name=name) -> None:
        sink.write(json.dumps({"name": name, **record}) + "\n")
        sink.flush()

      start = time.perf_counter()
      print(f"[{name}] start", flush=True)
      try:
        if row.framework == "jax" and not args.dry:
          _require_jax_gpu()
        result = TASKS[(row.framework, row.task)](row, args, batch_for(row, args), emit)
        emit({"status": "ok", "wall_s": time.perf_counter() - start, **result, "versions": versions()})
        print(f"[{name}] ok in {time.perf_counter() - start:.1f} s", flush=True)
      except Exception as e:  # pylint: disable=broad-except  (one row's failure is reported, the others still run)
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        emit({"status": "error", "wall_s": time.perf_counter() - start, "error": f"{type(e).__name__}: {e}"[:2000],
              "traceback_tail": tb[-3000:], "versions": versions()})
  return 0


# ---------------------------------------------------------------------------------------------------------------
# The orchestrator: one worker per row, time caps, the JSON after every row.


def _nvidia_smi() -> str | None:
  exe = shutil.which("nvidia-smi")
  if not exe:
    return None
  try:
    return subprocess.run([exe, "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                           "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
  except (OSError, subprocess.SubprocessError) as e:
    return f"nvidia-smi failed: {e}"


def _row_record(row: Row, args) -> dict[str, Any]:
  return {"name": row.name, "framework": row.framework, "task": row.task,
          "backbone": "tiny" if args.dry else row.backbone, "variant": row.variant, "dtype": row.dtype,
          "status": "pending"}


def comparisons(rows: list[dict[str, Any]]) -> dict[str, Any]:
  """img/s ratios of our rows over torch's, where both finished."""
  by = {r["name"]: r for r in rows if r.get("status") == "ok" and r.get("images_per_s")}
  out = {}
  for dt in ("bf16", "fp32"):
    torch_row = by.get(f"torch_train_b16_{dt}_maple")
    for ours in (f"jax_train_b16_{dt}_maple", f"jax_train_b16_{dt}_mcpf"):
      if torch_row and ours in by:
        out[f"{ours} / torch_train_b16_{dt}_maple"] = by[ours]["images_per_s"] / torch_row["images_per_s"]
    if f"torch_encode_b16_{dt}" in by and f"jax_encode_b16_{dt}" in by:
      out[f"jax_encode_b16_{dt} / torch_encode_b16_{dt}"] = (by[f"jax_encode_b16_{dt}"]["images_per_s"]
                                                             / by[f"torch_encode_b16_{dt}"]["images_per_s"])
  return out


def write_report(path: pathlib.Path, report: dict[str, Any], t_start: float) -> None:
  """Writes the report atomically (a reader never sees half a file), with the comparisons so far."""
  report["comparisons"] = comparisons(report["rows"])
  report["complete"] = all(r["status"] == "ok" for r in report["rows"])
  report["elapsed_s"] = round(time.perf_counter() - t_start, 1)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
  os.replace(tmp, path)


def table(rows: list[dict[str, Any]]) -> str:
  cols = [("name", "row", "s"), ("status", "status", "s"), ("batch", "batch", "d"), ("images_per_s", "img/s", ".1f"),
          ("step_ms", "ms/step", ".1f"), ("compile_s", "compile s", ".1f"), ("mfu", "MFU", ".1%"),
          ("peak_gib", "peak GiB", ".2f")]
  cells = [[format(r[k], f) if r.get(k) is not None else "-" for k, _, f in cols] for r in rows]
  widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h, _) in enumerate(cols)]
  lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, ((_, h, _), w) in enumerate(zip(cols, widths)))]
  lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in cells]
  return "\n".join(lines)


def _read_records(path: pathlib.Path) -> list[dict[str, Any]]:
  if not path.exists():
    return []
  out = []
  for line in path.read_text().splitlines():
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      pass  # a line cut by a kill
  return out


def _run_worker(names: list[str], args, result_file: pathlib.Path, cap_s: float, env: dict[str, str]
                ) -> tuple[str, int | None]:
  """Runs a worker for `names` with a wall-clock cap: ("done" | "timeout", return code)."""
  cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", *names, "--result_file",
         str(result_file), "--steps", str(args.steps), "--windows", str(args.windows), "--warmup", str(args.warmup),
         "--b16_batch", str(args.b16_batch), "--l14_batch", str(args.l14_batch),
         "--encode_batch", str(args.encode_batch)] + (["--dry"] if args.dry else [])
  proc = subprocess.Popen(cmd, env=env, start_new_session=True)  # pylint: disable=consider-using-with
  try:
    return "done", proc.wait(timeout=cap_s)
  except subprocess.TimeoutExpired:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
      try:
        os.killpg(proc.pid, sig)
        return "timeout", proc.wait(timeout=wait)
      except subprocess.TimeoutExpired:
        continue
      except ProcessLookupError:
        break
    return "timeout", proc.poll()


def orchestrate(args) -> int:
  t_start = time.perf_counter()
  names = args.rows or (list(DRY_ROWS) if args.dry else [r.name for r in ROWS])
  unknown = [n for n in names if n not in BY_NAME]
  if unknown:
    raise SystemExit(f"--rows: unknown {unknown}; expected names from {sorted(BY_NAME)}")
  if (args.dry or args.parity) and PARITY.name not in names:
    names = [*names, PARITY.name]
  rows_out = [_row_record(BY_NAME[n], args) for n in names]
  report: dict[str, Any] = {
      "benchmark": "gpu", "date": datetime.datetime.now().isoformat(timespec="seconds"), "dry": args.dry,
      "command": " ".join(sys.argv), "budget_s": args.budget_s,
      "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                  "nvidia_smi": None if args.dry else _nvidia_smi(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
                  "jax_default_matmul_precision": os.environ.get("JAX_DEFAULT_MATMUL_PRECISION")},
      "peaks_tflops": PEAKS,
      "mfu_method": ("analytic model FLOPs (mcpf_jax.model.flops.step_flops of what each implementation computes) "
                     "/ median step time / dense datasheet peak of the matmul arithmetic: bf16 rows vs bf16, fp32 "
                     "rows vs TF32 (JAX's default float32 matmul precision on the GPU uses TF32 tensor cores; the "
                     "torch fp32 rows allow TF32 to match; the matmul_peak row measures both)"),
      "settings": {"b16_batch": args.b16_batch, "l14_batch": args.l14_batch, "encode_batch": args.encode_batch,
                   "warmup": args.warmup, "windows": args.windows, "steps_per_window": args.steps,
                   "compile_cache": None if args.no_cache or args.dry else
                   "jax persistent cache in a fresh temporary folder: rows after the first reuse XLA's GPU "
                   "autotuning results of fusions they share (each program still compiles)",
                   "one_process_per_row": not args.dry},
      "same": SAME, "different": DIFFERENT, "rows": rows_out}
  out = pathlib.Path(args.out)
  write_report(out, report, t_start)

  env = dict(os.environ)
  cache = None
  if args.dry:
    env["JAX_PLATFORMS"] = "cpu"
  else:
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")  # one process per row: it may take the device
    if not args.no_cache:
      cache = tempfile.mkdtemp(prefix="mcpf_gpu_bench_cache_")
      env.setdefault("JAX_COMPILATION_CACHE_DIR", cache)
  tmpdir = pathlib.Path(tempfile.mkdtemp(prefix="mcpf_gpu_bench_"))
  groups = [names] if args.dry else [[n] for n in names]
  try:
    for group in groups:
      remaining = args.budget_s - (time.perf_counter() - t_start)
      records = {n: next(r for r in rows_out if r["name"] == n) for n in group}
      needed = args.min_row_s if args.dry else max(args.min_row_s, *(BY_NAME[n].min_s for n in group))
      if remaining < needed:
        for rec in records.values():
          rec.update(status="skipped", error=f"budget: {remaining:.0f} s left of --budget_s {args.budget_s}, "
                     f"the row needs {needed:.0f}")
        write_report(out, report, t_start)
        continue
      cap = min(remaining, sum(BY_NAME[n].cap_s for n in group) if not args.dry else remaining)
      result_file = tmpdir / f"{group[0]}.jsonl"
      print(f"=== {', '.join(group)} (cap {cap:.0f} s, {remaining:.0f} s left)", flush=True)
      start = time.perf_counter()
      worker_env = dict(env)
      if not args.dry and all(BY_NAME[n].framework == "torch" for n in group):
        worker_env["JAX_PLATFORMS"] = "cpu"  # the torch rows import mcpf_jax helpers: jax must not take the GPU
      outcome, rc = _run_worker(group, args, result_file, cap, worker_env)
      for rec in _read_records(result_file):
        target = records.get(rec.pop("name"))
        if target is not None:
          stage = rec.pop("stage", None)
          target.update(rec)
          if stage:
            target["last_stage"] = stage
      for name, rec in records.items():
        if rec["status"] == "pending":
          rec["status"] = "timeout" if outcome == "timeout" else "crashed"
          rec["error"] = (f"killed after {cap:.0f} s (its cap), last stage: {rec.get('last_stage', 'start-up')}"
                          if outcome == "timeout" else f"worker exited with code {rc} before finishing {name}")
          rec["wall_s"] = time.perf_counter() - start
      write_report(out, report, t_start)
      for rec in records.values():
        print(f"    {rec['name']}: {rec['status']}" + (f" {rec['images_per_s']:.1f} img/s" if rec.get(
            "images_per_s") else "") + (f" ({rec['error']})" if rec.get("error") else ""), flush=True)
  finally:
    shutil.rmtree(tmpdir, ignore_errors=True)
    if cache:
      shutil.rmtree(cache, ignore_errors=True)
  write_report(out, report, t_start)
  print()
  print(table(rows_out))
  for k, v in report["comparisons"].items():
    print(f"{k}: {v:.2f}x")
  parity = next((r for r in rows_out if r["name"] == PARITY.name), None)
  if parity and parity.get("status") == "ok":
    print(f"parity (maple, float32, CPU): loss {parity['loss_jax']:.6f} vs {parity['loss_torch']:.6f}, prompt "
          f"gradient relative difference {parity['prompt_grad_relative_diff']:.1e}")
  print(f"wrote {out} ({report['elapsed_s']} s)")
  return 0


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default=str(DEFAULT_OUT), help="the JSON report (rewritten after every row)")
  parser.add_argument("--dry", action="store_true", help="CPU, tiny CLIP, batch 2, one step: the code paths only")
  parser.add_argument("--rows", nargs="+", help=f"rows to run, in this order (default: all): {[r.name for r in ROWS]}")
  parser.add_argument("--parity", action="store_true", help="add the jax-vs-torch parity row (always on with --dry)")
  parser.add_argument("--budget_s", type=float, default=410.0,
                      help="wall-clock budget for all rows: no row starts, and a running one is killed, past it")
  parser.add_argument("--min_row_s", type=float, default=10.0,
                      help="start no row with less budget left (on the GPU also each row's own minimum, Row.min_s)")
  parser.add_argument("--b16_batch", type=int, default=256)
  parser.add_argument("--l14_batch", type=int, default=128)
  parser.add_argument("--encode_batch", type=int, default=1024)
  parser.add_argument("--warmup", type=int, default=2, help="steps before timing (the first one is reported)")
  parser.add_argument("--windows", type=int, default=3)
  parser.add_argument("--steps", type=int, default=5, help="steps per timed window")
  parser.add_argument("--no_cache", action="store_true", help="no persistent compilation/autotuning cache")
  parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
  parser.add_argument("--result_file", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.dry:
    args.warmup, args.windows, args.steps = 1, 1, 1
  if args.worker:
    return worker(args)
  return orchestrate(args)


if __name__ == "__main__":
  sys.exit(main())
