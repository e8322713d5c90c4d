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
      res = _common.alternate({"mcpf_jax": ours, "torch": theirs}, args.repeats)
      row = {"dtype": dtype, "batch": batch,
             "mcpf_jax_img_s": batch / res["mcpf_jax"]["median_s"], "torch_img_s": batch / res["torch"]["median_s"],
             "first_call_s": compile_s, "max_abs_diff": diff, "max_abs_feature": scale,
             "load_1m": res["mcpf_jax"]["load_1m_during"], "calls": res}
      row["ratio"] = row["mcpf_jax_img_s"] / row["torch_img_s"]
      rows.append(row)
      print(f"{dtype:>8} b{batch:<3} ours {row['mcpf_jax_img_s']:7.2f} img/s  torch {row['torch_img_s']:7.2f} img/s  "
            f"ratio {row['ratio']:.2f}  (max|diff| {diff:.2e} of {scale:.2f}; load {row['load_1m']})", flush=True)
    del params, encode, model
  print()
  print(_common.table(rows, [("dtype", "dtype", ""), ("batch", "batch", "d"), ("mcpf_jax_img_s", "mcpf_jax img/s", ".2f"),
                             ("torch_img_s", "torch img/s", ".2f"), ("ratio", "ratio", ".2f"),
                             ("max_abs_diff", "max|diff|", ".1e")]))
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
