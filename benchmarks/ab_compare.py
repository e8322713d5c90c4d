"""A/B timing of two versions of the code (git revisions or folders), alternated call by call on one machine.

On a shared machine the load changes minute to minute, so two versions timed one after the other are not
comparable. This starts one worker process per version (each imports mcpf_jax from its own source tree, builds
the same computation on the same random ViT-B/16 weights and compiles it once), then asks them in turn for one
timed call (A B A B ...), so both see the same load. Each worker also reports a checksum of its first output:
a performance change must not change the numbers (beyond float rounding).

  python benchmarks/ab_compare.py --what train --batch 8 --versions HEAD WORKTREE [--repeats 5]
  python benchmarks/ab_compare.py --what encode --batch 8 --versions HEAD~1 /tmp/some/checkout

--what: "train" (the MCPF train step of configs/base.py), "forward" (the IQA model's forward, no gradient),
"eval" (the eval step: --batch images x --crops crops), "encode" (CLIP encode_image). A version is a git
revision (exported with `git archive` to the cache folder), "WORKTREE" (this checkout as it is), or a folder.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import _common  # pylint: disable=g-bad-import-order  (sets XLA_FLAGS before jax is imported)


def _source(version: str) -> pathlib.Path:
  if version == "WORKTREE":
    return _common.REPO
  if os.path.isdir(version):
    return pathlib.Path(version).resolve()
  commit = subprocess.run(["git", "-C", str(_common.REPO), "rev-parse", version], check=True, capture_output=True,
                          text=True).stdout.strip()
  folder = _common.CACHE / f"src-{commit[:12]}"
  if not (folder / "mcpf_jax").is_dir():
    folder.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(_common.REPO), "archive", commit], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
  return folder


def _build(what: str, batch: int, crops: int, dtype: str):
  """Returns (call, checksum_of) for the computation `what`; `call()` blocks until its output is ready."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from configs import base  # pylint: disable=g-import-not-at-top
  from mcpf_jax import clip, resolve  # pylint: disable=g-import-not-at-top
  from mcpf_jax import model as iqa  # pylint: disable=g-import-not-at-top
  from mcpf_jax.clip import preprocess  # pylint: disable=g-import-not-at-top
  from mcpf_jax.model import freeze
  from mcpf_jax.train import optim
  from mcpf_jax.train import step as step_lib

  bundle = clip.load(_common.random_vit_b16(), dtype=dtype)
  rng = np.random.default_rng(0)
  size = bundle.config.vision.image_size
  if what == "encode":
    encode = jax.jit(lambda p, x: bundle.model.apply({"params": p}, x, method="encode_image"))
    x = jnp.asarray(rng.standard_normal((batch, size, size, 3)), jnp.float32)
    return lambda: encode(bundle.params, x).block_until_ready(), lambda out: float(jnp.sum(jnp.abs(out)))
  config = base.get_config()
  model, params = iqa.build(config.model, bundle, jax.random.key(0))
  if what == "forward":
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, preprocess.normalize(x))["score01"])
    x = jnp.asarray(rng.integers(0, 256, (batch, size, size, 3)), jnp.uint8)
    return lambda: fwd(params, x).block_until_ready(), lambda out: float(jnp.sum(out))
  if what == "eval":
    ev = jax.jit(step_lib.make_eval_step(model))
    b = {"image": jnp.asarray(rng.integers(0, 256, (batch, crops, size, size, 3)), jnp.uint8)}
    return lambda: ev(params, b).block_until_ready(), lambda out: float(jnp.sum(out))
  if what != "train":
    raise ValueError(f"--what {what!r}")
  mask = freeze.mask(params, config.model.trainable)
  tx = optim.make_optimizer(resolve.optim_config(config, 100), mask)
  step = jax.jit(step_lib.make_train_step(model, mask, tx, dict(config.loss)), donate_argnums=0)
  sys.path.insert(0, str(pathlib.Path(__file__).parent))
  from train_step import _batch  # pylint: disable=g-import-not-at-top
  b = jax.device_put(_batch(rng, batch, size))
  holder = {"state": step_lib.init_state(params, tx)}

  def call():
    holder["state"], metrics = jax.block_until_ready(step(holder["state"], b))
    return metrics

  return call, lambda m: float(m["loss"])


def _worker(args: argparse.Namespace) -> None:
  sys.path.insert(0, str(args.src))  # this version's mcpf_jax and configs, ahead of the checkout's
  start = time.perf_counter()
  call, checksum_of = _build(args.what, args.batch, args.crops, args.dtype)
  out = call()
  import mcpf_jax  # pylint: disable=g-import-not-at-top
  print(json.dumps({"ready": time.perf_counter() - start, "checksum": checksum_of(out),
                    "module": mcpf_jax.__file__}), flush=True)
  for line in sys.stdin:
    if line.strip() != "run":
      break
    t, _ = _common.timed(call)
    print(json.dumps({"s": t}), flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--what", default="train", choices=["train", "forward", "eval", "encode"])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--crops", type=int, default=15, help="crops per image (--what eval)")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--versions", nargs="+", default=["HEAD", "WORKTREE"])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", type=pathlib.Path, default=None, help="JSON file (default: print only)")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--src", type=pathlib.Path, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    _worker(args)
    return

  _common.random_vit_b16()
  workers = []
  for version in args.versions:
    src = _source(version)
    cmd = [sys.executable, __file__, "--worker", "--src", str(src), "--what", args.what, "--batch", str(args.batch),
           "--crops", str(args.crops), "--dtype", args.dtype]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=str(src))
    ready = json.loads(proc.stdout.readline())  # one at a time: compiling in parallel would slow both
    print(f"{version}: ready in {ready['ready']:.1f} s, checksum {ready['checksum']!r} ({ready['module']})",
          flush=True)
    workers.append((version, proc, ready))
  times = {v: [] for v, _, _ in workers}
  loads = []
  try:
    for _ in range(args.repeats):
      for version, proc, _ in workers:
        loads.append(os.getloadavg()[0])
        proc.stdin.write("run\n")
        proc.stdin.flush()
        times[version].append(json.loads(proc.stdout.readline())["s"])
  finally:
    for _, proc, _ in workers:
      proc.stdin.close()
      proc.wait()
  base = statistics.median(times[args.versions[0]])
  rows = []
  for version, _, ready in workers:
    med = statistics.median(times[version])
    rows.append({"version": version, "median_s": med, "min_s": min(times[version]), "speedup": base / med,
                 "checksum": ready["checksum"], "times_s": [round(t, 3) for t in times[version]]})
    print(f"{version:>12}: median {med:.3f} s (min {min(times[version]):.3f})  x{base / med:.3f} vs "
          f"{args.versions[0]}  times {rows[-1]['times_s']}")
  print(f"load (1 min) during: {min(loads):.2f}..{max(loads):.2f}")
  if args.out:
    settings = {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()}
    _common.write("ab_compare", {"machine": _common.machine(), "settings": settings,
                                 "load_1m_during": [min(loads), max(loads)], "results": rows}, args.out)


if __name__ == "__main__":
  main()
