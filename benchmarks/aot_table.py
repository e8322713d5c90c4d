"""The scaling table of BENCHMARKS.md: `python -m mcpf_jax.aot` over backbones x methods x topologies x batches.

Every row is one run of the pre-flight command (printed, so it can be re-run by hand); its JSON line is stored in
benchmarks/results/aot_table.json as it arrives, and rows already there are not compiled again (delete the file, or
pass --redo, to recompute). `--table` prints the markdown table from the stored rows only.

  python benchmarks/aot_table.py [--only SUBSTRING] [--redo] [--table]

Columns: peak HBM per device (XLA's buffer plan of the compiled step, or the compiler's out-of-memory figure) and
whether it fits; the largest batch per chip that fits, ESTIMATED from that one compile as (HBM - the fixed part:
arguments + outputs - aliased + code) / (temporaries per image), i.e. assuming temporaries grow linearly with the
batch; the collectives of one step; the step time at the stated MFU (of the chip's peak bf16 FLOP/s, on the
analytic model FLOPs) and the images/s per host the input pipeline must then deliver.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "aot_table.json"

B16, L14, L336 = "openai/clip-vit-base-patch16", "openai/clip-vit-large-patch14", "openai/clip-vit-large-patch14-336"
SHORT = {B16: "B/16", L14: "L/14", L336: "L/14-336"}
METHODS = {"mcpf": [], "maple": ["--config.model.name=maple"], "full": ["--config.model.trainable=all"]}

# (key, clip, method, topology, global batch, extra flags). The order is the priority: the rows that answer the
# issue first (MCPF on the three backbones, full fine-tuning on the main topologies), then the A/B of
# mesh.shard_backbone and clip.remat.
ROWS: list[tuple[str, str, str, str, int, list[str]]] = [
    ("b16-mcpf-v5e-1-32", B16, "mcpf", "v5e-1", 32, []),
    ("b16-mcpf-v5e-8-32", B16, "mcpf", "v5e-8", 32, []),
    ("l14-mcpf-v5e-8-256", L14, "mcpf", "v5e-8", 256, []),
    ("l336-mcpf-v5e-8-256", L336, "mcpf", "v5e-8", 256, []),
    ("b16-full-v5e-8-256", B16, "full", "v5e-8", 256, []),
    ("l336-full-v5e-4-2048", L336, "full", "v5e:2x2", 2048, []),
    ("b16-mcpf-v4-32-512", B16, "mcpf", "v4-32", 512, []),
    ("b16-mcpf-v5p-128-2048", B16, "mcpf", "v5p-128", 2048, []),
    ("l14-full-v5e-8-256", L14, "full", "v5e-8", 256, []),
    ("l14-full-v5e-8-256-remat", L14, "full", "v5e-8", 256, ["--config.clip.remat=True"]),
    ("l14-full-v5e-8-256-shard", L14, "full", "v5e-8", 256, ["--config.mesh.model=8",
                                                            "--config.mesh.shard_backbone=True"]),
    ("l14-mcpf-v5e-8-256-remat", L14, "mcpf", "v5e-8", 256, ["--config.clip.remat=True"]),
    ("b16-maple-v5e-8-32", B16, "maple", "v5e-8", 32, []),
    ("l14-full-v4-32-512", L14, "full", "v4-32", 512, []),
    ("l336-mcpf-v5p-128-2048", L336, "mcpf", "v5p-128", 2048, []),
    ("b16-mcpf-h100x8-256", B16, "mcpf", "h100:1x8", 256, []),
]


def command(clip: str, method: str, topology: str, batch: int, extra: list[str]) -> list[str]:
  return ["python", "-m", "mcpf_jax.aot", "--config", "configs/livec.py", "--topology", topology,
          f"--config.clip.name={clip}", f"--config.train.batch_size={batch}", "--steps=train", *METHODS[method],
          *extra]


def run_row(row) -> dict:
  key, clip, method, topology, batch, extra = row
  cmd = command(clip, method, topology, batch, extra)
  print("$", shlex.join(cmd), flush=True)
  env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  env.setdefault("TPU_LOG_DIR", "/tmp/mcpf_jax_tpu_logs")
  start = time.perf_counter()
  proc = subprocess.run(["nice", "-n", "19", sys.executable, *cmd[1:]], cwd=REPO, env=env, capture_output=True,
                        text=True)
  lines = proc.stdout.strip().splitlines()
  out = {"key": key, "command": shlex.join(cmd), "exit": proc.returncode, "wall_s": time.perf_counter() - start}
  if lines and lines[-1].startswith("{"):
    out["report"] = json.loads(lines[-1])
  else:
    out["error"] = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:400]
  print(f"  exit {proc.returncode} in {out['wall_s']:.0f} s: {out.get('error', 'ok')}", flush=True)
  return out


def _max_batch_per_chip(r: dict) -> int | None:
  t, hbm = r["train"], r["device_memory_bytes"]
  if not t.get("temp_size_in_bytes") or not hbm:
    return None
  fixed = t["argument_size_in_bytes"] + t["output_size_in_bytes"] - t["alias_size_in_bytes"] + \
      t["generated_code_size_in_bytes"]
  per_image = t["temp_size_in_bytes"] / (r["global_batch"] / r["mesh"]["data"])
  return max(int((hbm - fixed) / per_image), 0)


def _collectives(c: dict | None) -> str:
  if not c:
    return "-"
  return ", ".join(f"{k} x{v['count']} ({v['bytes'] / 2 ** 20:.1f} MiB)" for k, v in sorted(c.items()))


def table(results: dict) -> str:
  head = ("| backbone | method | options | topology (chips, hosts) | global batch | peak HBM / chip | fits | "
          "max batch / chip (est.) | collectives per step (per device) | step at 40% MFU | images/s per host |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for key, *_ in ROWS:
    res = results.get(key)
    if res is None:
      continue
    r = res.get("report")
    _, clip, method, topology, batch, extra = next(row for row in ROWS if row[0] == key)
    options = " ".join(x.replace("--config.", "") for x in extra) or "-"
    if r is None:
      lines.append(f"| {SHORT[clip]} | {method} | {options} | {topology} | {batch} | - | did not compile: "
                   f"{res.get('error', '')} | | | | |")
      continue
    peak = r["peak_bytes_per_device"]
    peak_s = f"{peak / 2 ** 30:.2f} GiB" if peak else "?"
    hbm = f" of {r['device_memory_bytes'] / 2 ** 30:.0f}" if r.get("device_memory_bytes") else ""
    mb = _max_batch_per_chip(r)
    step = f"{r['step_s_at_mfu'] * 1e3:.1f} ms" if r.get("step_s_at_mfu") else "-"
    rate = f"{r['images_per_s_per_host']:,.0f}" if r.get("images_per_s_per_host") else "-"
    lines.append(f"| {SHORT[clip]} | {method} | {options} | {topology} ({r['devices']}, {r['hosts']}) | {batch} | "
                 f"{peak_s}{hbm} | {'yes' if r['fits'] else '**no**'} | {mb if mb is not None else '-'} | "
                 f"{_collectives(r.get('collectives'))} | {step} | {rate} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--only", default="", help="run the rows whose key contains this")
  parser.add_argument("--redo", action="store_true", help="recompute rows already stored")
  parser.add_argument("--table", action="store_true", help="only print the table of the stored rows")
  args = parser.parse_args()
  results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
  if not args.table:
    for row in ROWS:
      if args.only not in row[0] or (row[0] in results and not args.redo):
        continue
      results[row[0]] = run_row(row)
      RESULTS.write_text(json.dumps(results, indent=1) + "\n")
  print(table(results))


if __name__ == "__main__":
  main()
