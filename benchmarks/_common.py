"""Shared by the benchmark scripts: thread settings, the machine record, the random ViT-B/16 folder, timing.

Import this module BEFORE jax (it sets XLA_FLAGS): every benchmark runs XLA's CPU client with its intra-op
thread pool sized to `threads` (default: all cores) and, where torch is compared, torch with the same number of
intra-op threads and one inter-op thread.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CACHE = pathlib.Path(os.environ.get("MCPF_BENCH_CACHE", "/tmp/mcpf_bench"))
THREADS = int(os.environ.get("MCPF_BENCH_THREADS", os.cpu_count() or 1))

# XLA CPU: the Eigen intra-op pool (matmuls, convolutions) gets THREADS threads. Kept if the caller set XLA_FLAGS.
_XLA_THREAD_FLAGS = f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={THREADS}"
os.environ.setdefault("XLA_FLAGS", _XLA_THREAD_FLAGS)
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))


def load_average() -> list[float]:
  """The 1, 5 and 15 minute load averages (the machine is shared: every measurement records them)."""
  return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
  """The SIMD features relevant to matmul speed (what XLA and torch can use on this CPU)."""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("flags"):
        flags = line.split(":", 1)[1].split()
        return sorted(f for f in flags if f.startswith(("avx", "fma", "amx")) or "vnni" in f or "bf16" in f)
  except OSError:
    pass
  return []


def machine() -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  return {"cpu": cpu_model(), "cpus": os.cpu_count(), "simd": cpu_flags(), "platform": platform.platform(),
          "python": platform.python_version(), "jax": jax.__version__, "jax_devices": [str(d) for d in jax.devices()],
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "threads": THREADS}


def random_vit_b16() -> pathlib.Path:
  """A Hugging Face CLIP folder with random ViT-B/16 weights in the real size, written once under CACHE.

  `init_random(preset("vit-b-16"))` (transformers' initialisation), saved with `save_pretrained` as
  config.json + model.safetensors + tokenizer files: both mcpf_jax (`clip.load`) and transformers'
  `CLIPModel.from_pretrained` read these same bytes.
  """
  folder = CACHE / "clip-vit-b-16-random-seed0"
  if not (folder / "done").exists():
    from mcpf_jax import clip  # pylint: disable=g-import-not-at-top
    clip.save_pretrained(folder, clip.init_random(clip.preset("vit-b-16"), seed=0), clip.preset("vit-b-16"),
                         tokenizer_files=True)
    (folder / "done").write_text("seed 0\n")
  return folder


def peak_rss_mib() -> float:
  """This process's peak resident set size so far (ru_maxrss, KiB on Linux), in MiB."""
  import resource  # pylint: disable=g-import-not-at-top
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def current_rss_mib() -> float:
  try:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
      if line.startswith("VmRSS:"):
        return round(int(line.split()[1]) / 1024, 1)
  except OSError:
    pass
  return float("nan")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
  """Seconds of one call of `fn` (which must block until its result is ready) and its result."""
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def alternate(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, Any]]:
  """Runs the calls round-robin (A B A B ...) `repeats` times; per name: the times, their median, the load.

  Alternating spreads the other tenants' load over every implementation instead of over one of them.
  """
  times = {name: [] for name in fns}
  loads = []
  for _ in range(repeats):
    for name, fn in fns.items():
      loads.append(os.getloadavg()[0])
      times[name].append(timed(fn)[0])
  return {name: {"times_s": [round(t, 4) for t in ts], "median_s": statistics.median(ts), "min_s": min(ts),
                 "load_1m_during": [round(min(loads), 2), round(max(loads), 2)]}
          for name, ts in times.items()}


def write(name: str, report: dict[str, Any], out: pathlib.Path | None = None) -> pathlib.Path:
  out = out or RESULTS / f"{name}.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  report = {"benchmark": name, "date": datetime.datetime.now().isoformat(timespec="seconds"), **report}
  out.write_text(json.dumps(report, indent=2) + "\n")
  print(f"wrote {out}")
  return out


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
  """Plain-text table: columns are (key, header, format spec)."""
  heads = [h for _, h, _ in columns]
  cells = [[format(r[k], f) if r.get(k) is not None else "-" for k, _, f in columns] for r in rows]
  widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
  lines = ["  ".join(h.rjust(w) for h, w in zip(heads, widths))]
  lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
  return "\n".join(lines)


def tower_layer_flops(tokens: int, width: int, mlp: int, queries: int | None = None) -> tuple[float, float]:
  """(matmul FLOPs, attention-core FLOPs) of one pre-LN block's forward: `mcpf_jax.model.flops.layer_flops`."""
  from mcpf_jax.model import flops  # pylint: disable=g-import-not-at-top
  return flops.layer_flops(tokens, width, mlp, queries)
