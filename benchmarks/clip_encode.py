"""CLIP ViT-B/16 image encoding: mcpf_jax (Flax, XLA) vs transformers' PyTorch CLIPModel, the same weights.

Both load one Hugging Face folder of random ViT-B/16 weights in the real size (`init_random(preset("vit-b-16"))`
written once with `save_pretrained`): ours with `mcpf_jax.clip.load`, theirs with `CLIPModel.from_pretrained`.
Each measured call encodes one batch of 224x224 images to projected features (`encode_image` /
`get_image_features`), from the same normalised pixels (NHWC for us, NCHW for torch), and blocks until done.

Per (batch, dtype): one warm-up call each (ours compiles there), then the two implementations alternate
(A B A B ...) `--repeats` times; images/s are from the median call. float32: both compute in float32 (XLA's
default CPU matmul precision is full float32). bfloat16: ours computes in bfloat16 from float32 parameters
(`clip.load(dtype="bfloat16")`, LayerNorm statistics in float32), torch runs the model cast to bfloat16.
Threads: XLA's intra-op pool and torch.set_num_threads both get `MCPF_BENCH_THREADS` (default: all cores),
torch one inter-op thread. The outputs are compared (max |difference| of the features) so "the same
weights" is checked, not assumed.

The machine's limit, in the same run: in float32 a 2048^3 matmul through XLA and through torch (MKL) alternates
with the two encoders; the peak is the faster one. Each encoder's achieved GFLOP/s uses the analytic FLOPs of
what it computes (transformers: every block on all 197 tokens; ours: the last block updates only CLS), and
"best ratio at peak" is how fast our FLOPs would run at that peak, over torch's measured images/s: the highest
ratio any float32 implementation of our computation could show on this machine.

  python benchmarks/clip_encode.py [--batch_sizes 8 32] [--dtypes float32 bfloat16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import pathlib

import _common  # pylint: disable=g-bad-import-order  (sets XLA_FLAGS before jax is imported)
import jax  # pylint: disable=g-import-not-at-top,wrong-import-order
import jax.numpy as jnp
import numpy as np


def _ours(folder: pathlib.Path, dtype: str):
  from mcpf_jax import clip  # pylint: disable=g-import-not-at-top
  bundle = clip.load(folder, dtype=dtype)
  encode = jax.jit(lambda p, x: bundle.model.apply({"params": p}, x, method="encode_image"))
  return bundle.params, encode


def _torch(folder: pathlib.Path, dtype: str):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  model = transformers.CLIPModel.from_pretrained(folder, dtype=torch.float32).eval()
  if dtype == "bfloat16":
    model = model.to(torch.bfloat16)
  return model


def _torch_features(model, pixels):
  out = model.get_image_features(pixel_values=pixels)
  # transformers 5 returns a model output object where 4.x returned the tensor.
  return out if hasattr(out, "shape") else out.pooler_output


def encode_flops(config, batch: int, cls_only_last: bool) -> float:
  """Analytic FLOPs of encoding `batch` images to projected features (patch embedding, blocks, projection).

  transformers runs every block on all 197 tokens; mcpf_jax's last block updates only CLS (`cls_only_last`).
  """
  v = config.vision
  tokens = 1 + v.num_patches
  dense, attention = _common.tower_layer_flops(tokens, v.hidden_size, v.intermediate_size)
  last = _common.tower_layer_flops(tokens, v.hidden_size, v.intermediate_size, queries=1 if cls_only_last else None)
  patch = 2 * v.num_patches * v.patch_size ** 2 * v.num_channels * v.hidden_size
  proj = 2 * v.hidden_size * config.projection_dim
  return batch * ((v.num_hidden_layers - 1) * (dense + attention) + sum(last) + patch + proj)


MATMUL_N = 2048  # the matmul-peak probe: float32 n x n @ n x n in each framework, alternated with the encoders


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch_sizes", type=int, nargs="+", default=[8, 32])
  parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
  parser.add_argument("--repeats", type=int, default=3, help="alternated calls per implementation")
  parser.add_argument("--out", type=pathlib.Path, default=None)
  args = parser.parse_args()

  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(_common.THREADS)
  torch.set_num_interop_threads(1)
  folder = _common.random_vit_b16()
  load_start = _common.load_average()
  print(f"{_common.cpu_model()}, {os.cpu_count()} CPUs ({' '.join(_common.cpu_flags())}); XLA and torch "
        f"{_common.THREADS} threads; load {load_start}; weights {folder}")
  rng = np.random.default_rng(0)
  from mcpf_jax import clip  # pylint: disable=g-import-not-at-top
  config = clip.load(folder).config
  ma = jax.device_put(rng.standard_normal((MATMUL_N, MATMUL_N)).astype(np.float32))
  mb = jax.device_put(rng.standard_normal((MATMUL_N, MATMUL_N)).astype(np.float32))
  ta, tb = torch.from_numpy(np.asarray(ma)), torch.from_numpy(np.asarray(mb))
  xla_matmul = jax.jit(jnp.matmul)
  xla_matmul(ma, mb).block_until_ready()
  rows = []
  for dtype in args.dtypes:
    params, encode = _ours(folder, dtype)
    model = _torch(folder, dtype)
    tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    for batch in args.batch_sizes:
      pixels = rng.standard_normal((batch, 224, 224, 3)).astype(np.float32)
      x_jax = jax.device_put(pixels)
      x_torch = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))).to(tdtype)

      def ours():
        return encode(params, x_jax).block_until_ready()

      def theirs():
        with torch.inference_mode():
          return _torch_features(model, x_torch)

      compile_s, ours_out = _common.timed(ours)  # first call: trace + compile + run
      _, theirs_out = _common.timed(theirs)
      diff = float(np.max(np.abs(np.asarray(ours_out, np.float32) - theirs_out.float().numpy())))
      scale = float(np.max(np.abs(theirs_out.float().numpy())))
      calls = {"mcpf_jax": ours, "torch": theirs}
      if dtype == "float32":  # the machine's matmul limit, measured in the same alternation (same load)
        calls["xla_matmul"] = lambda: xla_matmul(ma, mb).block_until_ready()
        calls["torch_matmul"] = lambda: torch.mm(ta, tb)
      res = _common.alternate(calls, args.repeats)
      row = {"dtype": dtype, "batch": batch,
             "mcpf_jax_img_s": batch / res["mcpf_jax"]["median_s"], "torch_img_s": batch / res["torch"]["median_s"],
             "first_call_s": compile_s, "max_abs_diff": diff, "max_abs_feature": scale,
             "load_1m": res["mcpf_jax"]["load_1m_during"], "calls": res}
      row["ratio"] = row["mcpf_jax_img_s"] / row["torch_img_s"]
      if dtype == "float32":
        ours_flops, torch_flops = encode_flops(config, batch, True), encode_flops(config, batch, False)
        row["peak_gflops"] = {k: 2 * MATMUL_N ** 3 / res[k]["median_s"] / 1e9 for k in ("xla_matmul", "torch_matmul")}
        peak = max(row["peak_gflops"].values())
        row["mcpf_jax_gflops"] = ours_flops / res["mcpf_jax"]["median_s"] / 1e9
        row["torch_gflops"] = torch_flops / res["torch"]["median_s"] / 1e9
        row["mcpf_jax_of_peak"], row["torch_of_peak"] = row["mcpf_jax_gflops"] / peak, row["torch_gflops"] / peak
        # The fastest our FLOPs could run at the measured peak, against torch's measured speed.
        row["ratio_bound_at_peak"] = (peak * 1e9 / ours_flops * batch) / row["torch_img_s"]
      rows.append(row)
      print(f"{dtype:>8} b{batch:<3} ours {row['mcpf_jax_img_s']:7.2f} img/s  torch {row['torch_img_s']:7.2f} img/s  "
            f"ratio {row['ratio']:.2f}  (max|diff| {diff:.2e} of {scale:.2f}; load {row['load_1m']})", flush=True)
      if dtype == "float32":
        print(f"         matmul peak {MATMUL_N}^3: XLA {row['peak_gflops']['xla_matmul']:.1f}, torch "
              f"{row['peak_gflops']['torch_matmul']:.1f} GFLOP/s; encoders at ours {row['mcpf_jax_gflops']:.1f} "
              f"({row['mcpf_jax_of_peak']:.0%}), torch {row['torch_gflops']:.1f} ({row['torch_of_peak']:.0%}); "
              f"best possible ratio at the peak {row['ratio_bound_at_peak']:.2f}", flush=True)
    params = encode = model = None  # free them before the next dtype
  print()
  print(_common.table(rows, [("dtype", "dtype", ""), ("batch", "batch", "d"),
                             ("mcpf_jax_img_s", "mcpf_jax img/s", ".2f"),
                             ("torch_img_s", "torch img/s", ".2f"), ("ratio", "ratio", ".2f"),
                             ("max_abs_diff", "max|diff|", ".1e")]))
  f32 = [r for r in rows if r["dtype"] == "float32"]
  if f32:
    print()
    print(_common.table(f32, [("batch", "batch", "d"), ("mcpf_jax_gflops", "ours GFLOP/s", ".1f"),
                              ("torch_gflops", "torch GFLOP/s", ".1f"), ("mcpf_jax_of_peak", "ours/peak", ".0%"),
                              ("torch_of_peak", "torch/peak", ".0%"),
                              ("ratio_bound_at_peak", "best ratio at peak", ".2f")]))
  _common.write("clip_encode", {
      "machine": _common.machine(), "load_average_start": load_start, "load_average_end": _common.load_average(),
      "settings": {"model": "CLIP ViT-B/16 vision tower + projection, random weights (init_random seed 0)",
                   "weights": str(folder), "image_size": 224, "repeats": args.repeats,
                   "torch": {"version": torch.__version__, "num_threads": torch.get_num_threads(),
                             "num_interop_threads": torch.get_num_interop_threads(),
                             "attn_implementation": "sdpa (transformers default)"},
                   "timing": "median of alternated calls, each blocking until its output is ready"},
      "results": rows}, args.out)


if __name__ == "__main__":
  main()
