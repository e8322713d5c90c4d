"""One MCPF training step on CLIP ViT-B/16: images/s, memory, compile time and model FLOPs utilisation (MFU).

The model is configs/base.py's (MCPF: 9-layer deep prompts in both towers, 8 + 8 prompts, cross-attention fusion,
quality + scene + distortion heads, prompts-only AdamW) around random ViT-B/16 weights in the real size (see
benchmarks/_common.py). The step is `mcpf_jax.train.step.make_train_step`, jitted with the state donated, as the
trainer does (one device, so no shardings).

Measured per batch size:
  - compile time: `jit(...).lower(state, batch)` and `.compile()` timed separately;
  - step time: the median of `--repeats` steps (after one warm-up step), images/s = batch / median;
  - memory: on CPU there is no device memory statistic (`device.memory_stats()` is None), so the process's
    resident set is reported: sampled every 5 ms while the steps run (peak), plus `ru_maxrss` (the process peak
    so far, compilation included) and XLA's own buffer plan of the compiled step (`memory_analysis()`:
    arguments + outputs + temporaries - aliased);
  - MFU against the MEASURED matmul peak: jitted float32 square matmuls through XLA (2048 and 3072: n x n @
    n x n), each run `--peak_calls` times before every step in the same loop (matmuls, step, matmuls, step, ...:
    they see the same machine load); peak = the larger of 2 * n^3 / median time. Two FLOP counts:
      * XLA: `cost_analysis()["flops"]` of the step (elementwise ops included), lowered with
        `clip.image_chunk = 0`: XLA's cost analysis counts a loop body once, so the chunked step's own count
        (`xla_compiled_gflop_per_step`, also recorded) misses all chunks but one at batch > 8;
      * analytic (model FLOPs, `analytic_flops` below), of the computation the model needs as it is written
        (the text tower on the class prompts' end-of-text span, the last vision block on CLS only: work that
        is skipped counts as fewer FLOPs, never as a higher MFU): the matmuls and attention of both towers, plus
        the backward through the activations (d input = d output @ W^T, the same FLOPs as the forward matmul)
        but NOT the frozen weights' gradients (never computed: only the prompts are differentiated). Attention's
        two batched matmuls (QK^T, PV) need four in the backward (dQ, dK, dP, dV). The patch embedding has no
        backward (frozen weights, pixel input). Layer norms, softmax, GELU, the fusion module and the optimizer
        are left out (< 1% here).

  python benchmarks/train_step.py [--batch_sizes 8 32] [--repeats 3] [--dtype float32]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import statistics
import threading
import time

import _common  # pylint: disable=g-bad-import-order  (sets XLA_FLAGS before jax is imported)
import jax  # pylint: disable=g-import-not-at-top,wrong-import-order
import jax.numpy as jnp
import numpy as np

MATMUL_SIZES = (2048, 3072)


def analytic_flops(clip_config, spec, batch: int, text_rows: int, text_tokens: int, train: bool = True) -> dict:
  """Model FLOPs of one forward (+ activation backward when `train`) of the IQA model.

  Args:
    clip_config: the CLIPConfig.
    spec: the ModelSpec (prompt counts).
    batch: images.
    text_rows: class prompts through the text tower (25: 5 quality + 9 scene + 11 distortion).
    text_tokens: positions per class prompt as computed (77, or the end-of-text span when truncated).
    train: add the backward through activations (matmuls 1x, attention core 2x the forward).
  """
  v, t = clip_config.vision, clip_config.text
  v_tokens = 1 + v.num_patches + spec.num_vision_prompts
  vd, va = _common.tower_layer_flops(v_tokens, v.hidden_size, v.intermediate_size)
  # The last vision block updates only CLS when the tokens are not returned (mcpf_jax.clip.layers.EncoderLayer).
  vd_last, va_last = _common.tower_layer_flops(v_tokens, v.hidden_size, v.intermediate_size, queries=1)
  td, ta = _common.tower_layer_flops(text_tokens, t.hidden_size, t.intermediate_size)
  patch = 2 * v.num_patches * (v.patch_size ** 2 * v.num_channels) * v.hidden_size
  proj_v = 2 * v.hidden_size * clip_config.projection_dim
  proj_t = 2 * t.hidden_size * clip_config.projection_dim
  fwd_v = batch * ((v.num_hidden_layers - 1) * (vd + va) + vd_last + va_last + proj_v)
  fwd_t = text_rows * (t.num_hidden_layers * (td + ta) + proj_t)
  out = {"vision_forward": fwd_v + batch * patch, "text_forward": fwd_t}
  if train:
    out["vision_backward"] = batch * ((v.num_hidden_layers - 1) * (vd + 2 * va) + vd_last + 2 * va_last + proj_v)
    out["text_backward"] = text_rows * (t.num_hidden_layers * (td + 2 * ta) + proj_t)
  out["total"] = sum(out.values())
  return out


class _RssSampler:
  """Max of /proc/self/status VmRSS sampled every `interval` s in a thread, between start() and stop()."""

  def __init__(self, interval: float = 0.005):
    self.interval, self.peak, self._stop = interval, 0.0, threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, _common.current_rss_mib())
      time.sleep(self.interval)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()


def _batch(rng: np.random.Generator, n: int, size: int) -> dict[str, np.ndarray]:
  mos01 = rng.uniform(size=n).astype(np.float32)
  scene = np.zeros((n, 9), np.float32)
  scene[np.arange(n), rng.integers(0, 9, n)] = 1
  return {"image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), "mos01": mos01,
          "mos_std01": np.full((n,), 0.05, np.float32), "level": np.minimum((mos01 * 5).astype(np.int32), 4),
          "scene": scene, "has_scene": np.ones((n,), np.float32),
          "distortion": rng.integers(0, 11, n).astype(np.int32), "has_distortion": np.ones((n,), np.float32)}


def text_tokens_computed(model) -> int:
  """Positions per class prompt the model's text tower computes (it may truncate to the end-of-text span)."""
  span = getattr(model, "text_span", None)
  return int(span) if span is not None else len(model.text_ids[0][1][0])


def _image_chunk(model):
  """(holder, image_chunk): the CLIP config (or, in trees before 33bc957, the model spec) that sets how many images
  one vision-tower pass encodes; (None, "absent") where nothing chunks (a SigLIP tower, 00786b0's tree)."""
  for holder in (model.clip_config, model.spec):
    if hasattr(holder, "image_chunk"):
      return holder, holder.image_chunk
  return None, "absent"


def _vision_pass(batch: int, model) -> int:
  """Images per vision-tower pass: the chunk size where the model chunks, else the batch."""
  holder, chunk = _image_chunk(model)
  if holder is None:
    return batch
  from mcpf_jax.clip.tuning import chunking  # pylint: disable=g-import-not-at-top
  return chunking(batch, chunk)[0]


def _flops(cost) -> float:
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch_sizes", type=int, nargs="+", default=[8, 32])
  parser.add_argument("--repeats", type=int, default=3, help="measured steps per batch size (after one warm-up)")
  parser.add_argument("--peak_calls", type=int, default=3, help="matmul calls before every measured step")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--remat", action="store_true", help="config.clip.remat = True")
  parser.add_argument("--scan_layers", action="store_true", help="config.clip.scan_layers = True")
  parser.add_argument("--out", type=pathlib.Path, default=None)
  args = parser.parse_args()

  from configs import base  # pylint: disable=g-import-not-at-top
  from mcpf_jax import clip, resolve  # pylint: disable=g-import-not-at-top
  from mcpf_jax import model as iqa  # pylint: disable=g-import-not-at-top
  from mcpf_jax.model import freeze
  from mcpf_jax.train import optim
  from mcpf_jax.train import step as step_lib

  load_start = _common.load_average()
  print(f"{_common.cpu_model()}, {os.cpu_count()} CPUs ({' '.join(_common.cpu_flags())}); XLA {_common.THREADS} "
        f"threads; load {load_start}")
  folder = _common.random_vit_b16()
  config = base.get_config()
  rss_before = _common.current_rss_mib()
  bundle = clip.load(folder, dtype=args.dtype, remat=args.remat).with_compute(scan_layers=args.scan_layers)
  model, params = iqa.build(config.model, bundle, jax.random.key(0))
  mask = freeze.mask(params, config.model.trainable)
  tx = optim.make_optimizer(resolve.optim_config(config, 100), mask)
  rss_params = _common.current_rss_mib()
  text_rows = sum(len(rows) for _, rows in model.text_ids)
  text_tokens = text_tokens_computed(model)
  print(f"params: {freeze.count(params, mask):,} trainable of {freeze.count(params):,}; text tower: {text_rows} "
        f"class prompts x {text_tokens} positions; RSS {rss_params:.0f} MiB after loading")

  matmul = jax.jit(jnp.matmul)
  operands = {n: (jax.random.normal(jax.random.key(1), (n, n), jnp.float32),
                  jax.random.normal(jax.random.key(2), (n, n), jnp.float32)) for n in MATMUL_SIZES}
  for a, b in operands.values():
    matmul(a, b).block_until_ready()

  step_fn = step_lib.make_train_step(model, mask, tx, dict(config.loss))
  rng = np.random.default_rng(0)
  rows = []
  for batch_size in args.batch_sizes:
    batch = jax.device_put(_batch(rng, batch_size, bundle.config.vision.image_size))
    state = step_lib.init_state(jax.tree.map(jnp.array, params), tx)  # copies: the donated state is consumed
    jitted = jax.jit(step_fn, donate_argnums=0)
    lower_s, lowered = _common.timed(lambda: jitted.lower(state, batch))
    compile_s, compiled = _common.timed(lowered.compile)
    rss_compiled_peak = _common.peak_rss_mib()
    cost = _flops(compiled.cost_analysis())
    # The FLOP count without the chunk loop (lowered only, not compiled: cheap).
    holder, _ = _image_chunk(model)
    flat_model = (model if holder is None else
                  model.clone(clip_config=holder.replace(image_chunk=0)) if holder is model.clip_config else
                  model.clone(spec=dataclasses.replace(holder, image_chunk=0)))
    flat_step = jax.jit(step_lib.make_train_step(flat_model, mask, tx, dict(config.loss)))
    xla_flops = _flops(flat_step.lower(state, batch).cost_analysis())
    mem = compiled.memory_analysis()
    plan = None
    if mem is not None:
      plan = {k: getattr(mem, k) for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                                           "alias_size_in_bytes", "generated_code_size_in_bytes")
              if hasattr(mem, k)}
      plan["total_mib"] = round((plan["argument_size_in_bytes"] + plan["output_size_in_bytes"]
                                 + plan["temp_size_in_bytes"] - plan["alias_size_in_bytes"]) / 2 ** 20, 1)
    warm_s, (state, metrics) = _common.timed(lambda: jax.block_until_ready(compiled(state, batch)))
    assert bool(metrics["finite"]), metrics
    step_times, peak_times, loads = [], {n: [] for n in MATMUL_SIZES}, []
    with _RssSampler() as sampler:
      for _ in range(args.repeats):
        for _ in range(args.peak_calls):
          for n, (a, b) in operands.items():
            peak_times[n].append(_common.timed(lambda: matmul(a, b).block_until_ready())[0])
        loads.append(os.getloadavg()[0])
        t, (state, metrics) = _common.timed(lambda: jax.block_until_ready(compiled(state, batch)))
        step_times.append(t)
    step_s = statistics.median(step_times)
    matmul_gflops = {n: 2 * n ** 3 / statistics.median(t) / 1e9 for n, t in peak_times.items()}
    peak_flops = max(matmul_gflops.values()) * 1e9
    model_flops = analytic_flops(bundle.config, model.spec, batch_size, text_rows, text_tokens)
    row = {
        "batch": batch_size, "dtype": args.dtype, "remat": args.remat, "scan_layers": args.scan_layers,
        "images_per_vision_pass": _vision_pass(batch_size, model),
        "images_per_s": batch_size / step_s, "step_s": step_s, "step_times_s": [round(t, 3) for t in step_times],
        "lower_s": lower_s, "compile_s": compile_s, "first_step_s": warm_s,
        "matmul_peak_gflops": peak_flops / 1e9, "matmul_gflops_by_size": matmul_gflops,
        "matmul_times_s": {n: [round(x, 4) for x in t] for n, t in peak_times.items()},
        "xla_gflop_per_step": xla_flops / 1e9, "xla_compiled_gflop_per_step": cost / 1e9,
        "analytic_gflop_per_step": model_flops["total"] / 1e9,
        "analytic_gflop_parts": {k: round(v / 1e9, 2) for k, v in model_flops.items()},
        "achieved_gflops_analytic": model_flops["total"] / step_s / 1e9,
        "mfu_analytic": model_flops["total"] / step_s / peak_flops,
        "mfu_xla": xla_flops / step_s / peak_flops,
        "rss_steps_peak_mib": sampler.peak, "rss_process_peak_mib": _common.peak_rss_mib(),
        "rss_after_compile_peak_mib": rss_compiled_peak, "xla_buffer_plan": plan,
        "load_1m_during": [round(min(loads), 2), round(max(loads), 2)], "loss": float(metrics["loss"]),
    }
    rows.append(row)
    print(f"b{batch_size:<3} {row['images_per_s']:.2f} img/s ({step_s:.2f} s/step)  lower {lower_s:.1f} s  compile "
          f"{compile_s:.1f} s  peak matmul {row['matmul_peak_gflops']:.1f} GFLOP/s  MFU analytic "
          f"{row['mfu_analytic']:.1%} (xla {row['mfu_xla']:.1%})  RSS peak {sampler.peak:.0f} MiB  "
          f"load {row['load_1m_during']}", flush=True)
    state = compiled = lowered = jitted = None  # free them before the next batch size
  print()
  print(_common.table(rows, [("batch", "batch", "d"), ("images_per_s", "img/s", ".2f"), ("step_s", "s/step", ".2f"),
                             ("compile_s", "compile s", ".1f"), ("lower_s", "lower s", ".1f"),
                             ("analytic_gflop_per_step", "model GFLOP", ".0f"),
                             ("xla_gflop_per_step", "XLA GFLOP", ".0f"),
                             ("matmul_peak_gflops", "peak GFLOP/s", ".1f"), ("mfu_analytic", "MFU", ".1%"),
                             ("mfu_xla", "MFU(xla)", ".1%"), ("rss_steps_peak_mib", "RSS peak MiB", ".0f")]))
  _common.write("train_step", {
      "machine": _common.machine(), "load_average_start": load_start, "load_average_end": _common.load_average(),
      "settings": {"model": "MCPF (configs/base.py model) on random ViT-B/16 weights", "weights": str(folder),
                   "dtype": args.dtype, "remat": args.remat, "scan_layers": args.scan_layers, "repeats": args.repeats,
                   "peak_calls": args.peak_calls,
                   "matmul_peak": f"jit(jnp.matmul) float32 n x n @ n x n, n in {MATMUL_SIZES}: the best median",
                   "image_chunk": _image_chunk(model)[1],
                   "text_rows": text_rows, "text_tokens_computed": text_tokens,
                   "rss_before_load_mib": rss_before, "rss_after_load_mib": rss_params,
                   "memory_note": "CPU: no device memory statistic; process RSS (sampled) and XLA's buffer plan"},
      "results": rows}, args.out)


if __name__ == "__main__":
  main()
