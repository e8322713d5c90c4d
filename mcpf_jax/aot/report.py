"""What the compiled programs say: memory, FLOPs and collectives read from XLA, an out-of-memory's numbers, and the
pre-flight's report in words (`format_report`) and as JSON (`report_keys`).
"""

from __future__ import annotations

import math
import re
from typing import Any

from mcpf_jax.aot.targets import GiB

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
                "collective-broadcast")
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r"|f8e\w+)\[([0-9,]*)\]")
_OP = re.compile(r"=\s*(.*?)\s(" + "|".join(_COLLECTIVES) + r")(-start)?\(")


def _shape_bytes(text: str) -> int:
  total = 0
  for dtype, dims in _SHAPE.findall(text):
    n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    total += n * _DTYPE_BYTES.get(dtype, 1)
  return total


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{kind: {"count", "bytes"}} of the collectives in an optimized HLO module (per device; async pairs once).

  Bytes are each op's result size per device (an all-gather's gathered result, a reduce-scatter's shard). A
  collective inside a loop body is listed once (none is, without gradient accumulation).
  """
  out: dict[str, dict[str, int]] = {}
  for line in hlo_text.splitlines():
    m = _OP.search(line)
    if not m or "-done" in line.split("=")[0]:
      continue
    kind = m.group(2)
    result = m.group(1)
    if m.group(3):  # an async start returns (operands, results[, context]): count the results half
      shapes = _SHAPE.findall(result)
      result_bytes = _shape_bytes(result) - sum(_shape_bytes(f"{d}[{s}]") for d, s in shapes[:len(shapes) // 2])
    else:
      result_bytes = _shape_bytes(result)
    entry = out.setdefault(kind, {"count": 0, "bytes": 0})
    entry["count"] += 1
    entry["bytes"] += result_bytes
  return out


def memory(compiled) -> dict[str, int]:
  mem = compiled.memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes")
  out = {k: int(getattr(mem, k)) for k in fields}
  plan = out["argument_size_in_bytes"] + out["output_size_in_bytes"] - out["alias_size_in_bytes"] + \
      out["temp_size_in_bytes"] + out["generated_code_size_in_bytes"]
  reported = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)
  out["peak_bytes"] = max(reported, plan)
  return out


def flops(compiled) -> float | None:
  """XLA's FLOPs of the compiled (per-device) program; None where the backend has no cost analysis (deviceless
  GPU compiles)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  return float(cost["flops"]) if cost and "flops" in cost else None


OOM = re.compile(r"RESOURCE_EXHAUSTED|[Oo]ut of memory|exceeds available")
_SIZE = r"([0-9.]+)\s*([KMGT])i?B?"


def oom_bytes(message: str) -> tuple[int | None, int | None]:
  """(required, available) bytes from an XLA out-of-memory message, where it states them."""
  unit = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
  m = re.search(r"required[^(]*\(" + _SIZE + r"\) exceeds available \w+ \(" + _SIZE + r"\)", message)
  if m:
    return int(float(m.group(1)) * unit[m.group(2)]), int(float(m.group(3)) * unit[m.group(4)])
  m = re.search(r"Used " + _SIZE + r" of " + _SIZE, message)
  if m:
    return int(float(m.group(1)) * unit[m.group(2)]), int(float(m.group(3)) * unit[m.group(4)])
  return None, None



def public(program: dict[str, Any]) -> dict[str, Any]:
  return {k: (round(v, 2) if k == "compile_s" else v) for k, v in program.items() if not k.startswith("_")}


def report_keys() -> tuple[str, ...]:
  return ("topology", "platform", "device_kind", "devices", "hosts", "mesh", "global_batch", "peak_bytes_per_device",
          "device_memory_bytes", "fits", "flops_per_step", "flops_per_device", "model_flops_per_step",
          "collectives", "compile_s")


def _gib(x: float | None) -> str:
  return "-" if x is None else f"{x / GiB:.2f} GiB"


def format_report(r: dict[str, Any]) -> str:
  lines = [f"{r['model']} on {r['clip']} (trainable={r['trainable']}, {r['dtype']}, remat={r['remat']}, "
           f"attention={r['attention']})",
           f"target {r['topology']}: {r['devices']} x {r['device_kind']} on {r['hosts']} host(s) of "
           f"{r['devices'] // r['hosts']} devices, {r['slices']} slice(s), mesh {r['mesh']}, "
           f"shard_backbone={r['shard_backbone']}" + (f" ({_gib(r['split_weight_bytes'])} of weights stored split, "
                                                      f"{_gib(r['gathered_weight_bytes'])} of them gathered once per "
                                                      "step)" if r.get("gather_once") else ""),
           f"global batch {r['global_batch']} (accumulate_steps={r['accumulate_steps']})"]
  for name in ("train", "eval"):
    p = r[name]
    if p.get("skipped"):
      lines.append(f"  {name} step: not compiled (--steps)")
      continue
    status = "fits" if p["fits"] and (r["device_memory_bytes"] is None or (p.get("peak_bytes") or 0)
                                      <= r["device_memory_bytes"]) else "DOES NOT FIT"
    lines.append(f"  {name} step: peak {_gib(p.get('peak_bytes'))} per device of {_gib(r['device_memory_bytes'])}"
                 f" -> {status} (compile {p['compile_s']:.1f} s)")
    if "error" in p:
      lines.append(f"    compiler: {p['error']}")
    elif "temp_size_in_bytes" in p:
      lines.append(f"    arguments {_gib(p['argument_size_in_bytes'])}, temporaries {_gib(p['temp_size_in_bytes'])}, "
                   f"outputs {_gib(p['output_size_in_bytes'])} (aliased {_gib(p['alias_size_in_bytes'])})")
  if r.get("flops_per_step") is not None:
    lines.append(f"  FLOPs per step: {r['flops_per_step']:.4g} (XLA, all devices; {r['flops_per_device']:.4g} per "
                 f"device; {r['flops_method']})")
    ratio = r.get("flops_vs_analytic", float("nan"))
    lines.append(f"    analytic: {r['model_flops_per_step']:.4g} model FLOPs, {r['analytic_flops_executed']:.4g} as "
                 f"the mesh runs them (class prompts split over data; XLA / that = {ratio:.3f})")
  for kind, c in sorted((r.get("collectives") or {}).items()):
    lines.append(f"  collective {kind}: {c['count']} per step, {c['bytes'] / 2 ** 20:.2f} MiB per device")
  if "step_s_at_mfu" in r:
    lines.append(f"  at {r['mfu']:.0%} MFU: {r['step_s_at_mfu'] * 1e3:.1f} ms per step, the input pipeline must "
                 f"deliver {r['images_per_s_per_host']:.0f} images/s per host")
  return "\n".join(lines)
