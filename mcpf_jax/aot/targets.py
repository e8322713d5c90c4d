"""Targets: the chips (memory, peak FLOP/s), topology names, and the compile-only devices of a TPU or GPU target.

TPU devices come from libtpu (`find_libtpu`: the TPU compiler, found without installing it as a backend), GPU ones
from deviceless CUDA compilation (`gpu_topology`).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
import re
import sys
from typing import Any

import jax

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
