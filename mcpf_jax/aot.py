"""Pre-flight: compile a config's train and eval steps ahead of time for a TPU or GPU topology this machine lacks.

  python -m mcpf_jax.aot --config configs/livec.py --topology v5e:2x4 [--num_slices 2] [--config.x=y ...]

The programs are the ones train.py runs: `mcpf_jax.train.step.jit_steps` (same functions, shardings, donation)
on a ("data", "model") mesh made from the config over the TARGET's compile-only devices, lowered from
`jax.ShapeDtypeStruct`s: no weights (the backbone's shapes come from its preset, a known hub id or a folder's
config.json), no dataset. The model's platform-dependent paths (attention kernel, image chunking) are chosen for
the target (`CLIPConfig.platform`), not for this process's CPU backend.

Prints a readable report, then, as its LAST line, one JSON object (keys in `report_keys`). Exit status 0 when
both steps fit in the target's per-device memory, 2 when one does not (the compiler's out-of-memory is caught
and reported, JSON included), 1 on bad input (a message naming the flag).

FLOPs: XLA's `cost_analysis()` of the partitioned (per-device) program; `flops_per_step` = that x devices. A loop
body is counted once by XLA: the CLIP layer stacks are Python loops (unrolled), and for a TPU/GPU target the image
chunk loop is off, so the only loop left is gradient accumulation (`train.accumulate_steps` > 1). Then the FLOPs
come from a second compile of the same step on one micro-batch (accumulate_steps = 1), times accumulate_steps
(`flops_method` says which). `model_flops_per_step` is the analytic count (`mcpf_jax.model.flops`) of the useful
work, each image once and the class prompts' text tower once; `analytic_flops_executed` counts the text tower as
the mesh runs it (the prompt rows padded to a multiple of the "data" axis and split over it, once per micro-batch)
and each image and prompt row once per device of the "model" axis: what `flops_per_step` is checked against
(`flops_vs_analytic`).

TPU targets need libtpu, the TPU compiler (`find_libtpu`): on a TPU VM the one `jax[tpu]` installs; on a CPU-only
machine the one `make aot-libtpu` keeps in <venv>/aot-libtpu, outside site-packages (importable, jax would start it
as a backend in every command of the venv, each then printing libtpu's errors about the TPU it cannot find).
Topology names (`TOPOLOGIES`) are libtpu's "<generation>:<chips per axis>", or the cloud names of common slices
(v5e-8, v4-32, v5p-128, ...).
GPU targets ("h100:1x8", "a100:1x8") use deviceless CUDA compilation (`jax-cuda12-plugin`); see `gpu_topology`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import sys
import time
from typing import Any

if __name__ == "__main__":
  # A pre-flight only compiles: the runtime backend stays the CPU (never a real chip this host may have), and
  # libtpu, loaded for its compiler, may coexist with other processes that load it.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no TPU VM metadata server to ask: this is not a TPU host
  # ... so libtpu, loading, would print errors about the TPU worker it cannot identify (INVALID_ARGUMENT ...
  # TPU_WORKER_HOSTNAMES, "Failed to find host bounds"). This process is one host of its own, worker 0; the
  # target's hosts come from the topology (get_topology_desc), not from these.
  os.environ.setdefault("TPU_WORKER_ID", "0")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")
  # A deviceless GPU compile cannot autotune, and XLA's Triton GEMM fusions need autotuning to pick their tiles
  # ("Couldn't find output tile sizes"): use its cuBLAS GEMMs, as with autotuning off. A GPU-only flag.
  if "--xla_gpu_enable_triton_gemm" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_triton_gemm=false").strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp

GiB = 2 ** 30

# device_kind -> per chip: HBM bytes, peak dense bf16 FLOP/s (the vendors' figures; float32 matmuls run as bf16
# passes at the default precision on TPUs). The compile-only devices carry no memory size: these are the chips'.
CHIPS: dict[str, dict[str, Any]] = {
    "TPU v2": {"name": "v2", "hbm_bytes": 8 * GiB, "peak_flops": 22.5e12},  # per TensorCore (each one device)
    "TPU v3": {"name": "v3", "hbm_bytes": 16 * GiB, "peak_flops": 61.5e12},  # per TensorCore (each one device)
    "TPU v4": {"name": "v4", "hbm_bytes": 32 * GiB, "peak_flops": 275e12},
    "TPU v5 lite": {"name": "v5e", "hbm_bytes": 16 * GiB, "peak_flops": 197e12},
    "TPU v5": {"name": "v5p", "hbm_bytes": 95 * GiB, "peak_flops": 459e12},
    "TPU v6 lite": {"name": "v6e", "hbm_bytes": 32 * GiB, "peak_flops": 918e12},
    "NVIDIA H100 80GB HBM3": {"name": "h100", "hbm_bytes": 84929347584, "peak_flops": 989e12},
    "NVIDIA A100-SXM4-80GB": {"name": "a100", "hbm_bytes": 85899345920, "peak_flops": 312e12},
}

# Cloud slice names -> (libtpu topology, chips per host). vN-K counts TensorCores on v4/v5p (2 per chip, one
# megacore device), chips on v5e/v6e. Any other "<gen>:<AxB[xC]>" name is passed to libtpu as it is.
TOPOLOGIES: dict[str, tuple[str, str | None]] = {
    "v2-8": ("v2:2x2", None),  # Colab's v2-8 runtime: 4 chips, 8 TensorCores (8 devices)
    "v5e-1": ("v5e:1x1", "1,1,1"),  # Colab's v5e-1 runtime, one chip
    "v5e-4": ("v5e:2x2", None),  # one host, 4 chips
    "v5e-8": ("v5e:2x4", "2,4,1"),  # one host, 8 chips (ct5lp-hightpu-8t)
    "v5e-16": ("v5e:4x4", None),  # 4 hosts x 4 chips
    "v6e-1": ("v6e:1x1", "1,1,1"),  # Colab's v6e-1 runtime
    "v6e-8": ("v6e:2x4", "2,4,1"),  # one host, 8 chips
    "v4-8": ("v4:2x2x1", None),  # one host, 4 chips
    "v4-32": ("v4:2x2x4", None),  # 4 hosts x 4 chips
    "v5p-8": ("v5p:2x2x1", None),  # one host, 4 chips
    "v5p-128": ("v5p:4x4x4", None),  # 16 hosts x 4 chips
}

GPU_TOPOLOGIES = {"h100": "NVIDIA H100 80GB HBM3", "a100": "NVIDIA A100-SXM4-80GB"}


class PreflightError(ValueError):
  """Bad input: the message names the flag or config field and what was expected."""


@dataclasses.dataclass
class Target:
  name: str
  platform: str
  devices: list[Any]
  num_slices: int = 1

  @property
  def device_kind(self) -> str:
    return self.devices[0].device_kind

  @property
  def hosts(self) -> int:
    return len({(getattr(d, "slice_index", 0), d.process_index) for d in self.devices})

  @property
  def chip(self) -> dict[str, Any]:
    return CHIPS.get(self.device_kind, {})


# Where a CPU-only machine keeps libtpu: in the venv (sys.prefix), beside its site-packages, never in it.
LIBTPU_FOLDER = "aot-libtpu"


def libtpu_requirement() -> str:
  """The libtpu the installed jax's `tpu` extra pins ("libtpu==0.0.42.*" for jax 0.10.2): the one to install."""
  for requirement in importlib.metadata.requires("jax") or ():
    spec, _, marker = requirement.partition(";")
    if re.match(r"libtpu\b", spec.strip()) and 'extra == "tpu"' in marker:
      return spec.replace(" ", "")
  raise PreflightError(f"jax {jax.__version__}'s package metadata names no libtpu for its `tpu` extra")


def libtpu_folder() -> str:
  return os.path.join(sys.prefix, LIBTPU_FOLDER)


def find_libtpu() -> str | None:
  """The libtpu.so a TPU compile loads, or None: $TPU_LIBRARY_PATH (jax's own setting), else an importable `libtpu`
  (a TPU VM's `jax[tpu]`), else <venv>/aot-libtpu/libtpu/libtpu.so (`make aot-libtpu`, a CPU-only machine)."""
  if os.environ.get("TPU_LIBRARY_PATH"):
    return os.environ["TPU_LIBRARY_PATH"]
  spec = importlib.util.find_spec("libtpu")
  if spec is not None and spec.origin:
    return os.path.join(os.path.dirname(spec.origin), "libtpu.so")
  path = os.path.join(libtpu_folder(), "libtpu", "libtpu.so")
  return path if os.path.isfile(path) else None


def install_libtpu_hint() -> str:
  """How to get the libtpu this jax needs: the commands, spelled out."""
  return (f"On a CPU-only machine, install it beside the venv, not into it (importable, jax would start it as a "
          f"backend in every command): `make aot-libtpu` in a checkout, which runs\n"
          f"  {sys.executable} -m pip install --no-deps --target {libtpu_folder()} '{libtpu_requirement()}'\n"
          f"(the libtpu jax {jax.__version__}'s `tpu` extra pins; this tool looks for it there), or set "
          f"TPU_LIBRARY_PATH to a libtpu.so. On a TPU VM: pip install 'jax[tpu]=={jax.__version__}'.")


def tpu_topology(name: str, num_slices: int = 1, chips_per_host: str | None = None) -> Target:
  """Compile-only TPU devices of `name` (a key of TOPOLOGIES or libtpu's "<gen>:<AxB[xC]>")."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  libtpu_name, default_host = TOPOLOGIES.get(name, (name, None))
  if not re.fullmatch(r"v(2|3|4|5e|5p|6e):\d+x\d+(x\d+)?", libtpu_name):
    raise PreflightError(f"--topology={name!r}: expected one of {sorted(TOPOLOGIES)}, a libtpu topology such as "
                         "'v5e:2x4' or 'v4:2x2x4' (v4, v5e, v5p, v6e), or a GPU node 'h100:1x8' / 'a100:1x8'")
  library = find_libtpu()
  if library is None:
    raise PreflightError(f"--topology={name!r} is a TPU target: compiling for it needs libtpu, the TPU compiler, "
                         f"and none was found.\n{install_libtpu_hint()}")
  if not os.path.isfile(library):
    raise PreflightError(f"--topology={name!r}: TPU_LIBRARY_PATH={library!r} is not a file (expected libtpu.so)")
  os.environ.setdefault("TPU_LIBRARY_PATH", library)  # where jax loads the TPU plugin from
  kwargs: dict[str, Any] = {}
  host = chips_per_host or default_host
  if host:
    kwargs["chips_per_host_bounds"] = tuple(int(x) for x in host.split(","))
  if libtpu_name.startswith("v4") or libtpu_name.startswith("v5p"):
    kwargs["chip_config_name"] = "megacore"  # one device per chip, as the TPU runtime presents them
  if num_slices > 1:
    kwargs["num_slices"] = num_slices
  try:
    topo = topologies.get_topology_desc(topology_name=libtpu_name, platform="tpu", **kwargs)
  except RuntimeError as e:  # libtpu refused the name or the options
    options = "".join(f", {k}={v}" for k, v in kwargs.items())
    raise PreflightError(f"--topology={name!r}: libtpu ({library}) refused topology {libtpu_name!r}{options}: "
                         f"{str(e).strip()}") from e
  return Target(name, "tpu", list(topo.devices), num_slices)


def _gpu_target_config(sm: str, cores: int, fpus: int, smem_core: int, smem_optin: int, l2: int, clock: float,
                       bandwidth: float, memory: int, description: str) -> str:
  """A GpuTargetConfigProto (text format) of the device description XLA's GPU compiler needs without a device."""
  major, minor = sm.split(".")
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {smem_core}
  threads_per_core_limit: 2048
  core_count: {cores}
  fpus_per_core: {fpus}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(bandwidth)}
  l2_cache_size: {l2}
  clock_rate_ghz: {clock}
  device_memory_size: {memory}
  shared_memory_per_block_optin: {smem_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{description}"
"""


# NVIDIA's published figures (SXM parts): SMs, FP32 lanes per SM, shared memory, L2, boost clock, HBM bandwidth and
# size (device_memory_size as the driver reports it, a little under the nominal 80 GB).
GPU_TARGET_CONFIGS = {
    "h100": _gpu_target_config("9.0", 132, 128, 233472, 232448, 50 * 2 ** 20, 1.98, 3.35e12, 84929347584,
                               GPU_TOPOLOGIES["h100"]),
    "a100": _gpu_target_config("8.0", 108, 64, 167936, 166912, 40 * 2 ** 20, 1.41, 2.04e12, 85899345920,
                               GPU_TOPOLOGIES["a100"]),
}


def gpu_topology(name: str) -> Target:
  """Compile-only CUDA devices for "h100:1x8" / "a100:1x8": deviceless compilation under JAX_PLATFORMS=cpu.

  Needs the CUDA PJRT plugin (`pip install jax-cuda12-plugin jax-cuda12-pjrt` at jax's version, plus ptxas from
  nvidia-cuda-nvcc-cu12); XLA then compiles for the target config above, without autotuning. Raises
  PreflightError saying why when that is not possible here.
  """
  kind, _, shape = name.partition(":")
  m = re.fullmatch(r"(\d+)x(\d+)", shape)
  if kind not in GPU_TOPOLOGIES or not m:
    raise PreflightError(f"--topology={name!r}: a GPU node is '<gpu>:<hosts>x<gpus per host>' with gpu one of "
                         f"{sorted(GPU_TOPOLOGIES)}, e.g. 'h100:1x8'")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  hosts, per_host = int(m.group(1)), int(m.group(2))
  try:
    topo = topologies.get_topology_desc(platform="cuda", target_config=GPU_TARGET_CONFIGS[kind],
                                        topology=f"1x{hosts}x{per_host}")
  except Exception as e:  # pylint: disable=broad-except  (NotImplementedError, JaxRuntimeError, RuntimeError)
    raise PreflightError(f"--topology={name!r}: deviceless CUDA compilation is not available here: "
                         f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}") from e
  return Target(name, "gpu", list(topo.devices))


def make_target(name: str, num_slices: int = 1, chips_per_host: str | None = None) -> Target:
  if num_slices < 1:
    raise PreflightError(f"--num_slices={num_slices}: expected a positive number of slices")
  if name.split(":")[0] in GPU_TOPOLOGIES:
    if num_slices != 1:
      raise PreflightError("--num_slices is for TPU topologies")
    return gpu_topology(name)
  return tpu_topology(name, num_slices, chips_per_host)


# ---------------------------------------------------------------------------------------------------------------
# The model, its state and batches, from shapes.


def clip_config_for(config, platform: str):
  """The run's CLIPConfig (no weights read), with the compute options of config.clip and the target platform."""
  from mcpf_jax.clip import config as clip_config  # pylint: disable=g-import-not-at-top
  from mcpf_jax.clip import tiny
  if config.clip.name == "tiny":
    cc = tiny.config_of(config.clip.tiny)
  else:
    try:
      cc = clip_config.from_name(config.clip.name)
    except ValueError as e:
      raise PreflightError(f"--config.clip.name: {e}") from e
  return cc.replace(dtype=config.clip.dtype, remat=bool(config.clip.remat), platform=platform)


def build(config, platform: str):
  """(model, param shapes, mask, tx, state shapes) of `config`, for `platform`, without computing anything."""
  from mcpf_jax import model as iqa  # pylint: disable=g-import-not-at-top
  from mcpf_jax.clip.siglip import SiglipConfig
  from mcpf_jax.clip.tokenizer import Tokenizer
  from mcpf_jax.model import freeze
  from mcpf_jax.train import optim, restore
  from mcpf_jax.train import step as step_lib
  cc = clip_config_for(config, platform)
  # CLIP: OpenAI's BPE (every CLIP preset's tokenizer), whose end-of-text position sets the text span the program
  # computes. SigLIP's text tower computes all its positions whatever the ids: placeholder ids of that length give
  # the same program, without the checkpoint's tokenizer.json.
  tokenizer = None if isinstance(cc, SiglipConfig) else Tokenizer.from_bpe_file()
  model = iqa.module(config.model, cc, tokenizer)
  params = iqa.abstract_params(model)
  # The frozen backbone as train.py stores it (clip.param_dtype): bf16 storage halves its bytes.
  store = jnp.dtype(config.clip.get("param_dtype", "float32"))
  params = dict(params, clip=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, store), params["clip"]))
  mask = freeze.mask(params, config.model.trainable)
  tx = optim.make_optimizer(restore.optim_config(config, 1), mask)
  state = jax.eval_shape(lambda p: step_lib.init_state(p, tx), params)
  return model, params, mask, tx, state


def train_batch_shapes(batch: int, image_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The train batch of mcpf_jax.data.pipeline.train_loader (int64 index arrives as int32 without x64)."""
  f32, i32 = jnp.float32, jnp.int32
  return {"image": jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.uint8),
          "mos": jax.ShapeDtypeStruct((batch,), f32), "mos01": jax.ShapeDtypeStruct((batch,), f32),
          "mos_std01": jax.ShapeDtypeStruct((batch,), f32), "level": jax.ShapeDtypeStruct((batch,), i32),
          "scene": jax.ShapeDtypeStruct((batch, 9), f32), "has_scene": jax.ShapeDtypeStruct((batch,), f32),
          "distortion": jax.ShapeDtypeStruct((batch,), i32), "has_distortion": jax.ShapeDtypeStruct((batch,), f32),
          "index": jax.ShapeDtypeStruct((batch,), i32)}


def eval_batch_shapes(batch: int, crops: int, image_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """What the trainer's evaluation passes to the eval step: the crops only."""
  return {"image": jax.ShapeDtypeStruct((batch, crops, image_size, image_size, 3), jnp.uint8)}


def _bytes_per_device(shapes: Any) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (its shard of each leaf)."""
  return sum(math.prod(s.sharding.shard_shape(s.shape)) * jnp.dtype(s.dtype).itemsize for s in jax.tree.leaves(shapes))


def _with_sharding(shapes: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


# ---------------------------------------------------------------------------------------------------------------
# What the compiled programs say.

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


def _memory(compiled) -> dict[str, int]:
  mem = compiled.memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes")
  out = {k: int(getattr(mem, k)) for k in fields}
  plan = out["argument_size_in_bytes"] + out["output_size_in_bytes"] - out["alias_size_in_bytes"] + \
      out["temp_size_in_bytes"] + out["generated_code_size_in_bytes"]
  reported = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)
  out["peak_bytes"] = max(reported, plan)
  return out


def _flops(compiled) -> float | None:
  """XLA's FLOPs of the compiled (per-device) program; None where the backend has no cost analysis (deviceless
  GPU compiles)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  return float(cost["flops"]) if cost and "flops" in cost else None


_OOM = re.compile(r"RESOURCE_EXHAUSTED|[Oo]ut of memory|exceeds available")
_SIZE = r"([0-9.]+)\s*([KMGT])i?B?"


def _oom_bytes(message: str) -> tuple[int | None, int | None]:
  """(required, available) bytes from an XLA out-of-memory message, where it states them."""
  unit = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
  m = re.search(r"required[^(]*\(" + _SIZE + r"\) exceeds available \w+ \(" + _SIZE + r"\)", message)
  if m:
    return int(float(m.group(1)) * unit[m.group(2)]), int(float(m.group(3)) * unit[m.group(4)])
  m = re.search(r"Used " + _SIZE + r" of " + _SIZE, message)
  if m:
    return int(float(m.group(1)) * unit[m.group(2)]), int(float(m.group(3)) * unit[m.group(4)])
  return None, None


def compile_program(jitted, *args) -> dict[str, Any]:
  """Lower + compile; {"fits", "compile_s", memory..., "flops_per_device", "collectives"} or the OOM's numbers."""
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except  (XlaRuntimeError/JaxRuntimeError by version)
    message = str(e)
    if not _OOM.search(message):
      raise
    required, available = _oom_bytes(message)
    return {"fits": False, "compile_s": time.perf_counter() - start, "peak_bytes": required,
            "compiler_limit_bytes": available, "error": message.strip().splitlines()[0][:500]}
  out = {"fits": True, "compile_s": time.perf_counter() - start, **_memory(compiled),
         "flops_per_device": _flops(compiled), "collectives": collectives(compiled.as_text())}
  out["_compiled"] = compiled
  out["_lowered"] = lowered
  return out


# ---------------------------------------------------------------------------------------------------------------


def preflight(config, target: Target, *, mfu: float = 0.4, steps: tuple[str, ...] = ("train", "eval"),
              keep_programs: bool = False) -> dict[str, Any]:
  """Compiles the config's train and eval steps for `target` and returns the report (see the module docstring).

  steps: which programs to compile ("train", "eval"); `fits` covers those compiled.
  """
  from mcpf_jax import resolve  # pylint: disable=g-import-not-at-top
  from mcpf_jax.model import flops as flops_lib
  from mcpf_jax.train import mesh as mesh_lib
  from mcpf_jax.train import step as step_lib
  n = len(target.devices)
  try:
    mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.model, devices=target.devices)
  except ValueError as e:
    raise PreflightError(f"--config.mesh.data={config.mesh.data} / --config.mesh.model={config.mesh.model} on "
                         f"{target.name}: {e}") from e
  # The config the real run resolves on this mesh (batch sizes rounded up where the data axis does not divide them).
  try:
    config = resolve.resolve(config, n)
  except ValueError as e:
    raise PreflightError(f"--config.{e} (on {target.name})") from e
  acc, crops = int(config.train.accumulate_steps), int(config.eval.num_crops)
  batch, eval_batch = int(config.train.batch_size), int(config.eval.batch_size)

  model, params, mask, tx, state = build(config, target.platform)
  cc, spec = model.clip_config, model.spec
  image_size = resolve.image_size(config, cc)
  train_step, eval_step, s_sh, p_sh, b_sh = step_lib.jit_steps(config, model, mask, tx, params, state, mesh)
  train_args = (_with_sharding(state, s_sh), _with_sharding(train_batch_shapes(batch, image_size),
                                                            {k: b_sh for k in train_batch_shapes(1, 1)}))
  eval_args = (_with_sharding(params, p_sh), _with_sharding(eval_batch_shapes(eval_batch, crops, image_size),
                                                            {"image": b_sh}))
  skipped = {"fits": True, "compile_s": 0.0, "skipped": True}
  train = compile_program(train_step, *train_args) if "train" in steps else dict(skipped)
  evaluation = compile_program(eval_step, *eval_args) if "eval" in steps else dict(skipped)

  flops_method = "cost_analysis"
  per_device = train.get("flops_per_device")
  if acc > 1 and train["fits"] and "train" in steps:
    # The accumulation loop's body is counted once: compile one micro-batch's step and scale it.
    micro_config = config.copy_and_resolve_references()
    with micro_config.unlocked():
      micro_config.train.batch_size = batch // acc
      micro_config.train.accumulate_steps = 1
    micro_step = step_lib.jit_steps(micro_config, model, mask, tx, params, state, mesh)[0]
    micro = compile_program(micro_step, train_args[0], _with_sharding(
        train_batch_shapes(batch // acc, image_size), {k: b_sh for k in train_batch_shapes(1, 1)}))
    micro_flops = micro.get("flops_per_device")
    per_device = micro_flops * acc if micro_flops is not None else None
    flops_method = f"cost_analysis of one micro-batch x accumulate_steps={acc} (the scan body is counted once)"

  text_rows = sum(len(rows) for _, rows in model.text_ids)
  pooled_only = spec.head != "text_query"
  backbone_trains = any(l == "trainable" for l in jax.tree.leaves(mask["clip"]))
  model_flops = flops_lib.step_flops(cc, spec, batch, text_rows, model.text_span, train=True,
                                     backbone_trains=backbone_trains, pooled_only=pooled_only)
  eval_flops = flops_lib.step_flops(cc, spec, eval_batch * crops, text_rows, model.text_span, train=False,
                                    pooled_only=pooled_only)
  # What the devices run, once per micro-batch: the class prompts split over "data" when it has more than one
  # device (padded to a multiple of it: step.jit_steps' text sharding), else on every device; each prompt row and
  # each image on the mesh.model devices of its data shard (rows and batch are split over "data" only).
  data = mesh.shape["data"]
  rows_run = -(-text_rows // data) * data if data > 1 else text_rows
  executed = (model_flops["text"] * rows_run / text_rows * acc + model_flops["vision"]) * mesh.shape["model"]
  chip = target.chip
  hbm = chip.get("hbm_bytes")
  fits = train["fits"] and evaluation["fits"]
  if hbm is not None:
    fits = fits and all(p.get("peak_bytes") is not None and p["peak_bytes"] <= hbm
                        for p in (train, evaluation) if not p.get("skipped"))
  report: dict[str, Any] = {
      "topology": target.name, "platform": target.platform, "device_kind": target.device_kind, "devices": n,
      "hosts": target.hosts, "slices": target.num_slices, "mesh": dict(mesh.shape),
      "model": config.model.name, "clip": config.clip.name, "trainable": str(config.model.trainable),
      "dtype": cc.dtype, "remat": cc.remat, "shard_backbone": bool(config.mesh.shard_backbone),
      "attention": _attention_path(cc), "vision_chunk": _vision_chunk(cc, spec, batch), "global_batch": batch,
      "accumulate_steps": acc,
      "peak_bytes_per_device": train.get("peak_bytes"), "device_memory_bytes": hbm, "fits": fits,
      "state_bytes_per_device": _bytes_per_device(train_args[0]),
      "train": _public(train), "eval": {**_public(evaluation), "images_per_step": eval_batch * crops},
      "flops_per_device": per_device, "flops_per_step": per_device * n if per_device is not None else None,
      "flops_method": flops_method, "model_flops_per_step": model_flops["total"],
      "analytic_flops_executed": executed, "eval_model_flops_per_step": eval_flops["total"],
      "collectives": train.get("collectives"), "compile_s": round(train["compile_s"] + evaluation["compile_s"], 2),
  }
  if report["flops_per_step"] is not None:
    report["flops_vs_analytic"] = report["flops_per_step"] / executed
  elif train.get("fits") and "train" in steps:
    report["flops_method"] = f"none: the {target.platform} compiler gives no cost analysis here (analytic count only)"
  if chip.get("peak_flops"):
    step_s = model_flops["total"] / (n * chip["peak_flops"] * mfu)
    report.update(mfu=mfu, peak_flops_per_chip=chip["peak_flops"], step_s_at_mfu=step_s,
                  images_per_s_per_host=batch / step_s / target.hosts)
  if keep_programs:
    report["_programs"] = {"train": train, "eval": evaluation}
  return report


def _attention_path(cc) -> str:
  from mcpf_jax.clip.tuning import attention_for  # pylint: disable=g-import-not-at-top
  return attention_for(cc.target_platform())


def _vision_chunk(cc, spec, batch: int) -> int:
  """Images per vision-tower pass of the train step (the whole batch unless a chunk loop runs)."""
  from mcpf_jax.clip.tuning import chunking  # pylint: disable=g-import-not-at-top
  return chunking(batch, spec.image_chunk, cc.vision.hidden_size, cc.target_platform())[0]


def _public(program: dict[str, Any]) -> dict[str, Any]:
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
           f"shard_backbone={r['shard_backbone']}",
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


def main(argv) -> int:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  config = f.config
  try:
    target = make_target(f.topology, f.num_slices, f.chips_per_host)
    steps = tuple(x for x in f.steps if x)
    if not steps or set(steps) - {"train", "eval"}:
      raise PreflightError(f"--steps={','.join(f.steps)}: expected 'train', 'eval' or 'train,eval'")
    report = preflight(config, target, mfu=f.mfu, steps=steps)
  except PreflightError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(format_report(report))
  print(json.dumps(report, default=float))
  return 0 if report["fits"] else 2


def _define_flags() -> None:
  """The command's flags, defined here so that absl files them under this module's name (`mcpf_jax.aot`, the help's
  heading), not under `__main__`'s file path."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "config file (configs/*.py); --config.<field>=<value> overrides")
  flags.DEFINE_string("topology", None, f"target: {', '.join(sorted(TOPOLOGIES))}, a libtpu name such as "
                      "'v5e:2x4', or a GPU node 'h100:1x8'")
  flags.DEFINE_integer("num_slices", 1, "TPU slices (multi-slice over DCN); the mesh spans all their devices")
  flags.DEFINE_string("chips_per_host", None, "TPU chips per host as 'x,y,z' (default: the cloud slice's, or "
                      "libtpu's for a libtpu name)")
  flags.DEFINE_list("steps", ["train", "eval"], "programs to compile: train, eval or both")
  flags.DEFINE_float("mfu", 0.4, "model FLOPs utilisation assumed for the step time and input rate")
  flags.mark_flags_as_required(["config", "topology"])


HELP_FLAGS = ("-h", "-?", "-help", "--help", "--helpshort", "--helpfull")


def cli(argv: list[str] | None = None) -> None:
  """`python -m mcpf_jax.aot`: parses the flags and exits with main's status; --help prints this module's docstring
  and its flags and exits 0 (absl's own --help exits 1)."""
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  argv = sys.argv if argv is None else argv
  _define_flags()
  if any(a in HELP_FLAGS for a in argv[1:]):
    print(__doc__.rstrip())
    print("\nflags:")
    if "--helpfull" in argv:
      print(flags.FLAGS.get_help())
    else:
      print(flags.FLAGS.module_help(__name__))
      print("\nTry --helpfull for every flag (absl's, e.g. --verbosity, and the libraries').")
    sys.exit(0)
  app.run(lambda rest: sys.exit(main(rest)), argv=argv)


if __name__ == "__main__":
  # The module under its import name, so its flags are `mcpf_jax.aot`'s (the environment above is already set).
  from mcpf_jax import aot  # pylint: disable=g-import-not-at-top,import-self
  aot.cli()
