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
S2B16, S2SO400M = "google/siglip2-base-patch16-224", "google/siglip2-so400m-patch14-384"
SHORT = {B16: "B/16", L14: "L/14", L336: "L/14-336", S2B16: "SigLIP 2 B/16", S2SO400M: "SigLIP 2 So400m/14-384"}
SCAN, SCAN_SUFFIX = "--config.clip.scan_layers=True", "-scan"
METHODS = {"mcpf": [], "maple": ["--config.model.name=maple"], "full": ["--config.model.trainable=all"]}

# (key, clip, method, topology, global batch, extra flags). The order is the priority: the rows that answer the
# scaling question first (MCPF on the three backbones, full fine-tuning on the main topologies), then the A/B of
# mesh.shard_backbone and clip.remat.
ROWS: list[tuple[str, str, str, str, int, list[str]]] = [
    # The Colab notebook's default (configs/livec.py as it is) on Colab's v5e-1 runtime: train AND eval steps.
    ("b16-mcpf-v5e-1-32", B16, "mcpf", "v5e-1", 32, ["--steps=train,eval"]),
    ("b16-mcpf-v5e-8-32", B16, "mcpf", "v5e-8", 32, []),
    ("l14-mcpf-v5e-8-256", L14, "mcpf", "v5e-8", 256, []),
    ("l336-mcpf-v5e-8-256", L336, "mcpf", "v5e-8", 256, []),
    ("b16-full-v5e-8-256", B16, "full", "v5e-8", 256, []),
    ("l336-full-v5e-4-2048", L336, "full", "v5e:2x2", 2048, ["--steps=train,eval"]),  # a reference run: does not fit
    ("b16-mcpf-v4-32-512", B16, "mcpf", "v4-32", 512, []),
    ("b16-mcpf-v5p-128-2048", B16, "mcpf", "v5p-128", 2048, []),
    ("b16-mcpf-h100x8-256", B16, "mcpf", "h100:1x8", 256, []),
    ("b16-mcpf-v6e-1-32", B16, "mcpf", "v6e-1", 32, ["--steps=train,eval"]),  # Colab's other TPU runtimes
    ("b16-mcpf-v2-8-32", B16, "mcpf", "v2-8", 32, ["--steps=train,eval"]),
    ("l14-full-v5e-8-256", L14, "full", "v5e-8", 256, []),
    ("l14-mcpf-v5e-8-256-remat", L14, "mcpf", "v5e-8", 256, ["--config.clip.remat=True"]),
    ("l14-mcpf-v5e-8-256-shard", L14, "mcpf", "v5e-8", 256, ["--config.mesh.model=2",
                                                            "--config.mesh.shard_backbone=True"]),
    ("b16-maple-v5e-8-32", B16, "maple", "v5e-8", 32, []),
    ("l336-mcpf-v5p-128-2048", L336, "mcpf", "v5p-128", 2048, []),
    ("l14-mcpf-h100x8-256", L14, "mcpf", "h100:1x8", 256, []),
    ("l14-full-v5e-8-256-remat", L14, "full", "v5e-8", 256, ["--config.clip.remat=True"]),
    ("l14-full-v5e-8-256-shard", L14, "full", "v5e-8", 256, ["--config.mesh.model=2",
                                                            "--config.mesh.shard_backbone=True"]),
    # clip.scan_layers: the table's scan column of the row without the "-scan" suffix (not rows of their own).
    ("l14-mcpf-v5e-8-256-scan", L14, "mcpf", "v5e-8", 256, [SCAN]),
    ("b16-mcpf-v5e-8-32-scan", B16, "mcpf", "v5e-8", 32, [SCAN]),
    ("l14-full-v5e-8-256-scan", L14, "full", "v5e-8", 256, [SCAN]),
    # SigLIP 2 (issue 23): B/16 at 224 and So400m/14 at 384, 32 images per chip, v5e and v6e, without / with remat.
    *[(f"{short}-mcpf-{topo}-256{'-remat' if remat else ''}", clip, "mcpf", topo, 256,
       ["--config.clip.remat=True"] if remat else [])
      for short, clip in (("s2b16", S2B16), ("s2so400m", S2SO400M)) for topo in ("v5e-8", "v6e-8")
      for remat in (False, True)],
]


def command(clip: str, method: str, topology: str, batch: int, extra: list[str]) -> list[str]:
  return ["python", "-m", "mcpf_jax.aot", "--config", "configs/livec.py", "--topology", topology,
          f"--config.clip.name={clip}", f"--config.train.batch_size={batch}", "--steps=train", *METHODS[method],
          *extra]


def run_row(row) -> dict:
  key, clip, method, topology, batch, extra = row
  cmd = command(clip, method, topology, batch, extra)
  gpu = topology.split(":")[0] in ("h100", "a100")
  shown = ("PYTHONPATH=$MCPF_CUDA_PLUGIN_PATH " if gpu else "") + shlex.join(cmd)
  print("$", shown, flush=True)
  env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1", TPU_SKIP_MDS_QUERY="1")
  if gpu and os.environ.get("MCPF_CUDA_PLUGIN_PATH"):
    # The CUDA PJRT plugin, installed apart (pip install --target DIR jax-cuda12-plugin jax-cuda12-pjrt) so the
    # TPU rows and the tests never see it.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ["MCPF_CUDA_PLUGIN_PATH"], env.get("PYTHONPATH")]))
  env.setdefault("TPU_LOG_DIR", "/tmp/mcpf_jax_tpu_logs")
  start = time.perf_counter()
  proc = subprocess.run(["nice", "-n", "19", sys.executable, *cmd[1:]], cwd=REPO, env=env, capture_output=True,
                        text=True)
  lines = proc.stdout.strip().splitlines()
  out = {"key": key, "command": shown, "exit": proc.returncode, "wall_s": time.perf_counter() - start}
  if lines and lines[-1].startswith("{"):
    out["report"] = json.loads(lines[-1])
  else:
    lines = [l for l in proc.stderr.strip().splitlines() if "Traceback" in l or "Error" in l or "error:" in l]
    out["error"] = (lines or proc.stderr.strip().splitlines() or ["(no output)"])[-1][:600]
    out["stderr_tail"] = proc.stderr[-4000:]
  print(f"  exit {proc.returncode} in {out['wall_s']:.0f} s: {out.get('error', 'ok')}", flush=True)
  return out


def _memory_point(r: dict) -> tuple[float, float, float] | None:
  """(images per device, fixed bytes, temporary bytes) of a compiled train step; after an out-of-memory, the
  compiler's temporaries figure and the state's bytes per device (the donated state: argument and aliased output)."""
  t = r["train"]
  per_device_batch = r["global_batch"] / r["mesh"]["data"]
  if t.get("temp_size_in_bytes"):
    fixed = t["argument_size_in_bytes"] + t["output_size_in_bytes"] - t["alias_size_in_bytes"] + \
        t["generated_code_size_in_bytes"]
    return per_device_batch, fixed, t["temp_size_in_bytes"]
  if t.get("peak_bytes") and r.get("state_bytes_per_device"):
    return per_device_batch, r["state_bytes_per_device"], t["peak_bytes"]
  return None


def _group(key: str) -> tuple:
  _, clip, method, _, _, extra = next(row for row in ROWS if row[0] == key)
  return clip, method, tuple(x for x in extra if not x.startswith("--steps"))


def max_batch_per_device(key: str, results: dict) -> str:
  """The largest per-device batch whose train step fits in HBM, from the compiles of the same model.

  Temporaries are linear in the batch plus a part that is not (the replicated text tower, the optimizer): with
  two compiles of the same model on the same kind of chip at different per-device batches, the line through
  them gives "~N"; with one, temporaries / batch over-counts the per-image cost, so (HBM - fixed) / that is a
  lower bound, ">= N".
  """
  r = results[key]["report"]
  hbm = r.get("device_memory_bytes")
  point = _memory_point(r)
  if not hbm or point is None:
    return "-"
  same = [results[k]["report"] for k in results if results[k].get("report") and _group(k) == _group(key)
          and results[k]["report"]["device_kind"] == r["device_kind"]]
  points = sorted({p[0]: p for p in map(_memory_point, same) if p is not None}.values())
  if len(points) >= 2 and points[0][0] != points[-1][0]:
    (b0, f0, t0), (b1, _, t1) = points[0], points[-1]
    slope = (t1 - t0) / (b1 - b0)
    if slope > 0:
      return f"~{max(int((hbm - f0 - (t0 - slope * b0)) / slope), 0)}"
  batch, fixed, temp = point
  return f">= {max(int((hbm - fixed) / (temp / batch)), 0)}"


def _collectives(c: dict | None) -> str:
  if not c:
    return "-"
  return ", ".join(f"{k} x{v['count']} ({v['bytes'] / 2 ** 20:.1f} MiB)" for k, v in sorted(c.items()))


def table(results: dict) -> str:
  head = ("| backbone | method | options | topology (chips, hosts) | global batch | peak HBM / chip | fits | "
          "max batch / device | collectives per step (per device) | XLA FLOPs / model FLOPs | step at 40% MFU | "
          "images/s per host | compile s | with clip.scan_layers: compile s, peak HBM / chip |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for key, *_ in ROWS:
    res = results.get(key)
    if res is None or key.endswith(SCAN_SUFFIX):  # a scan row is the scan column of the row it extends
      continue
    r = res.get("report")
    _, clip, method, topology, batch, extra = next(row for row in ROWS if row[0] == key)
    options = " ".join("(+ eval step)" if x == "--steps=train,eval" else x.replace("--config.", "")
                       for x in extra) or "-"
    if r is None:
      lines.append(f"| {SHORT[clip]} | {method} | {options} | {topology} | {batch} | - | did not compile: "
                   f"{res.get('error', '')} | | | | | | | |")
      continue
    if r.get("gather_once"):  # mesh.GatherOnce: what the collectives column is to be read against
      options += (f" (FSDP, each weight gathered once: {r['gathered_weight_bytes'] / 2 ** 30:.2f} GiB of the "
                  f"{r['split_weight_bytes'] / 2 ** 30:.2f} GiB stored split)")
    peak = r["peak_bytes_per_device"]
    peak_s = f"{peak / 2 ** 30:.2f} GiB" if peak else "?"
    hbm = f" of {r['device_memory_bytes'] / 2 ** 30:.0f}" if r.get("device_memory_bytes") else ""
    mb = max_batch_per_device(key, results)
    step = f"{r['step_s_at_mfu'] * 1e3:.1f} ms" if r.get("step_s_at_mfu") else "-"
    rate = f"{r['images_per_s_per_host']:,.0f}" if r.get("images_per_s_per_host") else "-"
    ratio = f"{r['flops_per_step'] / r['model_flops_per_step']:.3f}" if r.get("flops_per_step") else "-"
    lines.append(f"| {SHORT[clip]} | {method} | {options} | {topology} ({r['devices']}, {r['hosts']}) | {batch} | "
                 f"{peak_s}{hbm} | {'yes' if r['fits'] else '**no**'} | {mb} | "
                 f"{_collectives(r.get('collectives'))} | {ratio} | {step} | {rate} | {_compile_s(r)} | "
                 f"{_scan_column(results.get(key + SCAN_SUFFIX))} |")
  return "\n".join(lines)


def _compile_s(r: dict) -> str:
  s = r.get("train", {}).get("compile_s")
  return "-" if s is None else f"{s:.0f}"


def _scan_column(res: dict | None) -> str:
  """The same row compiled with clip.scan_layers=True (its "-scan" row): train compile seconds, peak HBM."""
  if res is None:
    return "-"
  r = res.get("report")
  if r is None:
    return f"did not compile: {res.get('error', '')}"
  peak = r["peak_bytes_per_device"]
  fits = "" if r["fits"] else " (**does not fit**)"
  return f"{_compile_s(r)} s, {peak / 2 ** 30:.2f} GiB{fits}" if peak else f"{_compile_s(r)} s, ?"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--only", default="", help="run the rows whose key contains this")
  parser.add_argument("--keys", default="", help="run exactly these rows (comma-separated keys), in this order")
  parser.add_argument("--redo", action="store_true", help="recompute rows already stored")
  parser.add_argument("--table", action="store_true", help="only print the table of the stored rows")
  args = parser.parse_args()
  results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
  if not args.table:
    keys = [k for k in args.keys.split(",") if k]
    rows = [next(row for row in ROWS if row[0] == k) for k in keys] if keys else ROWS
    for row in rows:
      if args.only not in row[0] or (row[0] in results and not args.redo):
        continue
      results[row[0]] = run_row(row)
      RESULTS.write_text(json.dumps(results, indent=1) + "\n")
  print(table(results))


if __name__ == "__main__":
  main()
