"""The exported ONNX model (`export --onnx`) in ONNX Runtime vs our CPU Scorer, on the same crops: file size, images/s.

The model is the smoke run's (configs/smoke.py cut to one epoch, as tests/conftest.py's `smoke_run`; trained once
into the benchmark cache unless --workdir names a run). Its `model.onnx` is made as `python -m mcpf_jax.export
--onnx` makes it (`mcpf_jax.export.onnx_model`) and its size recorded. The crops are the evaluation crops of the
55 CLIVE-miniature photos (`Scorer.preprocessing.crops`, made once, in memory); both sides score the same uint8
[batch, num_crops, S, S, 3] batches: ONNX Runtime's CPU provider (`InferenceSession.run`, MCPF_BENCH_THREADS intra-op
threads) and the Scorer's model as it scores on the CPU (`jax.jit(Scorer.crops_fn())`, XLA with as many threads).
For context, the portable form of the same function (`crops_fn(portable=True)`: the graph the ONNX model and
model.stablehlo are made from, with no CPU-specific choices) is timed in jax too. They alternate pass by pass
(`--passes`, after a warm-up pass that compiles); images/s from the median pass.
The scores of the two are compared (max relative difference).

  python benchmarks/onnx_throughput.py [--workdir RUN] [--batch_sizes 1 16] [--passes 5]
"""

from __future__ import annotations

import argparse
import os
import pathlib

import _common  # pylint: disable=g-bad-import-order  (sets XLA_FLAGS before jax is imported)
import jax  # pylint: disable=g-import-not-at-top,wrong-import-order
import numpy as np

CLIVE = _common.REPO / "tests" / "data" / "clive-mini" / "ChallengeDB_release" / "Images"


def _smoke_run(workdir: pathlib.Path | None) -> pathlib.Path:
  if workdir is not None:
    return workdir
  workdir = _common.CACHE / "smoke_run_1epoch"
  if not (workdir / "done").exists():
    from configs import smoke  # pylint: disable=g-import-not-at-top
    from mcpf_jax.train import trainer  # pylint: disable=g-import-not-at-top
    config = smoke.get_config()
    config.train.num_epochs = 1
    config.train.checkpoint_every = 2
    trainer.train_and_evaluate(config, workdir)
    (workdir / "done").write_text("trained\n")
  return workdir


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", type=pathlib.Path, default=None, help="a trained smoke run (default: train one)")
  parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16])
  parser.add_argument("--passes", type=int, default=5)
  parser.add_argument("--out", type=pathlib.Path, default=None)
  args = parser.parse_args()

  import onnxruntime  # pylint: disable=g-import-not-at-top

  from mcpf_jax import export  # pylint: disable=g-import-not-at-top
  from mcpf_jax.scoring import Scorer  # pylint: disable=g-import-not-at-top

  load_start = _common.load_average()
  print(f"{_common.cpu_model()}, {os.cpu_count()} CPUs; {_common.THREADS} threads; load {load_start}")
  scorer = Scorer.from_checkpoint(_smoke_run(args.workdir), "best")
  convert_s, data = _common.timed(lambda: export.onnx_model(scorer)[0])
  onnx_bytes = len(data)
  print(f"model.onnx: {onnx_bytes} bytes ({onnx_bytes / 1e6:.1f} MB), converted in {convert_s:.1f} s")
  options = onnxruntime.SessionOptions()
  options.intra_op_num_threads = _common.THREADS
  options.inter_op_num_threads = 1
  session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
  ours = jax.jit(scorer.crops_fn())
  portable = jax.jit(scorer.crops_fn(portable=True))

  paths = sorted(p for p in CLIVE.rglob("*") if p.suffix.lower() in (".jpg", ".bmp"))
  crops = np.stack([scorer.preprocessing.crops(p.read_bytes(), str(p))[0] for p in paths])
  n = len(crops)
  prep = scorer.preprocessing
  print(f"{n} images, {prep.num_crops} crops of {prep.image_size} (short side {prep.resize}) each")

  rows = []
  for batch_size in args.batch_sizes:
    batches = [crops[i:i + batch_size] for i in range(0, n, batch_size)]

    def run_onnx():
      return np.concatenate([session.run(["score"], {"crops": b})[0] for b in batches])

    def run_jax():
      return np.concatenate([np.asarray(ours(b)) for b in batches])

    def run_portable():
      return np.concatenate([np.asarray(portable(b)) for b in batches])

    warm_onnx, a = _common.timed(run_onnx)
    warm_jax, b = _common.timed(run_jax)  # compiles (each batch shape once)
    warm_portable, c = _common.timed(run_portable)
    rel = float(np.max(np.abs(a - b) / np.abs(b)))
    timing = _common.alternate({"onnxruntime": run_onnx, "jax": run_jax, "jax_portable": run_portable}, args.passes)
    row = {"batch_size": batch_size, "images": n, "max_rel_diff": rel,
           "portable_max_rel_diff": float(np.max(np.abs(c - b) / np.abs(b))),
           "first_pass_s": {"onnxruntime": warm_onnx, "jax": warm_jax, "jax_portable": warm_portable}}
    for name, t in timing.items():
      row[f"{name}_img_s"] = n / t["median_s"]
      row[name] = t
    row["ratio"] = row["onnxruntime_img_s"] / row["jax_img_s"]
    rows.append(row)
  print(_common.table(rows, [("batch_size", "batch", "d"), ("onnxruntime_img_s", "onnxruntime img/s", ".1f"),
                             ("jax_img_s", "Scorer (jax) img/s", ".1f"), ("ratio", "ort / jax", ".2f"),
                             ("jax_portable_img_s", "jax portable img/s", ".1f"),
                             ("max_rel_diff", "max rel diff", ".1e")]))
  load_end = _common.load_average()
  print(f"load at the end {load_end}")
  _common.write("onnx_throughput", {
      "machine": _common.machine(), "onnxruntime": onnxruntime.__version__, "onnx_bytes": onnx_bytes,
      "convert_s": convert_s, "num_crops": prep.num_crops, "image_size": prep.image_size, "resize": prep.resize,
      "load_start": load_start, "load_end": load_end, "rows": rows}, args.out)


if __name__ == "__main__":
  main()
