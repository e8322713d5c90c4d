"""The training loop with and without a blocking device_get of the metrics at every step (same steps, same data).

`python benchmarks/host_sync.py [--config configs/smoke.py] [--steps 40] [--repeats 3]`

Both loops are the trainer's: real decoding (grain, `data.num_workers` workers), `global_batch`, the jitted,
donated train step. "per-step sync" fetches the metrics after every step (the loop before this change: the host
waits for the device, then decodes the next batch); "deferred" keeps them on the device and fetches them every
`--check_every` steps (the loop now: the next batch is decoded while the device runs the step). Alternated
`--repeats` times; results in benchmarks/results/host_sync.json.
"""

from __future__ import annotations

import argparse
import pathlib
import runpy
import sys
import tempfile

import _common  # sets XLA_FLAGS before jax
import jax  # pylint: disable=g-import-not-at-top


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--config", default=str(_common.REPO / "configs" / "smoke.py"))
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--check_every", type=int, default=10)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--batch_size", type=int, default=32)
  args = p.parse_args(argv)
  from mcpf_jax import resolve
  from mcpf_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mcpf_jax.train import build, optim
  from mcpf_jax.train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from mcpf_jax.train import step as step_lib
  config = runpy.run_path(args.config)["get_config"]()
  workdir = pathlib.Path(tempfile.mkdtemp(prefix="host_sync_"))
  with config.unlocked():
    config.train.batch_size = args.batch_size
  run = build.build_run(config, workdir)
  train_idx = run.data.indices["train"]
  ocfg = resolve.optim_config(config, len(train_idx) // args.batch_size)
  tx = optim.make_optimizer(ocfg, run.mask)
  state = step_lib.init_state(run.params, tx)
  train_step, _, s_sh, _, b_sh = step_lib.jit_steps(config, run.model, run.mask, tx, run.params, state, run.mesh)
  box = {"state": jax.device_put(state, s_sh)}

  def loop(sync: bool):
    it = iter(pipeline.train_loader(run.data.source, train_idx, batch_size=args.batch_size,
                                    image_size=run.image_size, resize=config.data.resize, seed=config.seed,
                                    score_map=run.data.score_map, num_workers=config.data.num_workers))
    pending = []
    for i in range(args.steps):
      batch = mesh_lib.global_batch(next(it), b_sh)
      box["state"], m = train_step(box["state"], batch)
      if sync:
        assert jax.device_get(m)["finite"]
      else:
        pending.append(m)
        if (i + 1) % args.check_every == 0:
          assert all(x["finite"] for x in jax.device_get(pending))
          pending.clear()
    jax.block_until_ready(box["state"])

  loop(True)  # compile and warm up
  results = _common.alternate({"per-step sync": lambda: loop(True), "deferred": lambda: loop(False)}, args.repeats)
  rows = []
  for name, r in results.items():
    rows.append({"loop": name, "median_s": r["median_s"], "steps_per_s": args.steps / r["median_s"],
                 "img_per_s": args.steps * args.batch_size / r["median_s"]})
  speedup = results["per-step sync"]["median_s"] / results["deferred"]["median_s"]
  print(_common.table(rows, [("loop", "loop", "s"), ("median_s", "s per run", ".2f"),
                             ("steps_per_s", "steps/s", ".2f"), ("img_per_s", "img/s", ".1f")]))
  print(f"deferred / per-step sync speed: {speedup:.3f}x")
  _common.write("host_sync", {"machine": _common.machine(), "config": args.config, "steps": args.steps,
                              "batch_size": args.batch_size, "check_every": args.check_every,
                              "num_workers": config.data.num_workers, "results": results, "rows": rows,
                              "speedup": speedup, "load_after": _common.load_average(),
                              "command": " ".join(["python", "benchmarks/host_sync.py"] + sys.argv[1:])})


if __name__ == "__main__":
  main()
