"""One device mesh for everything, and the shardings of parameters, optimizer state and batches on it.

Axes ("data", "model"): the batch is split over "data"; the frozen backbone is replicated by default, or, with
`mesh.shard_backbone`, its large kernels are split over "model" (FSDP-style, for L/14 on small-memory chips).
Prompts, fusion and optimizer state are tiny and replicated.
"""

from __future__ import annotations

import collections
import functools
import re
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# Backbone leaves at least this large are sharded when mesh.shard_backbone is on (smaller ones stay replicated).
_MIN_SHARDED_SIZE = 2 ** 18
_BACKBONE = re.compile(r"^clip/")


def make_mesh(data: int = -1, model: int = 1, devices: list[jax.Device] | None = None) -> Mesh:
  """A ("data", "model") mesh over all devices (of all processes); one size may be -1 = the rest."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if data == -1 and model == -1:
    raise ValueError("mesh: at most one of mesh.data and mesh.model may be -1")
  if data == -1:
    data = n // model
  if model == -1:
    model = n // data
  if data * model != n or data < 1 or model < 1:
    raise ValueError(f"mesh: data={data} x model={model} does not use the {n} devices available")
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if slices > 1:
    # Multi-slice TPU: the data axis spans the slices (gradients all-reduced over DCN), "model" stays in a slice.
    if data % slices:
      raise ValueError(f"mesh: data={data} must be a multiple of the {slices} TPU slices (it spans them)")
    grid = mesh_utils.create_hybrid_device_mesh((data // slices, model), (slices, 1), devices)
    return Mesh(grid, ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  # Auto axes: shardings are given at the jit boundary and XLA propagates them (jax's default became Explicit).
  return jax.make_mesh((data, model), ("data", "model"), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def describe(mesh: Mesh) -> str:
  d = mesh.devices.flat[0]
  return (f"{mesh.devices.size} devices ({d.platform} {getattr(d, 'device_kind', '')}, {jax.process_count()} "
          f"process(es)), mesh data={mesh.shape['data']} x model={mesh.shape['model']}")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over "data", everything else replicated."""
  return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _leaf_spec(path: str, shape: tuple[int, ...], mesh: Mesh, shard_backbone: bool) -> P:
  size = int(np.prod(shape)) if shape else 1
  n = mesh.shape["model"]
  if not shard_backbone or n == 1 or not _BACKBONE.search(path) or size < _MIN_SHARDED_SIZE:
    return P()
  # The largest axis that the model axis divides.
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % n == 0:
      spec = [None] * len(shape)
      spec[axis] = "model"
      return P(*spec)
  return P()


def param_shardings(params: Any, mesh: Mesh, shard_backbone: bool = False) -> Any:
  """NamedShardings for a parameter tree (arrays or ShapeDtypeStructs), keyed by path rules."""
  flat = traverse_util.flatten_dict(params, sep="/")
  out = {k: NamedSharding(mesh, _leaf_spec(k, tuple(np.shape(v)), mesh, shard_backbone)) for k, v in flat.items()}
  return traverse_util.unflatten_dict(out, sep="/")


def state_shardings(state_shapes: Any, params_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for the train state: params as given, everything else (optimizer state, step) replicated.

  The optimizer state only holds trainable (prompt-sized) leaves, so replicating it costs nothing.
  """
  rep = replicated(mesh)
  return {"params": params_shardings, "opt": jax.tree.map(lambda _: rep, state_shapes["opt"]),
          "step": rep}


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """This process's slice of the batch -> global jax.Arrays split over "data" (works on 1 and N hosts)."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def sync(name: str) -> None:
  """A barrier across processes (multi-host), a no-op in one process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


@functools.cache
def gather_fn(mesh: Mesh):
  """A jitted identity whose outputs are replicated: brings a batch-sharded pytree to every process."""
  return jax.jit(lambda tree: tree, out_shardings=replicated(mesh))


def to_host(x: jax.Array) -> np.ndarray:
  """A replicated (or single-process) array as numpy; works when the array spans other processes' devices too."""
  if x.is_fully_addressable:
    return np.asarray(x)
  if not x.is_fully_replicated:
    raise ValueError("to_host needs a replicated array across processes (use gather_fn first)")
  return np.asarray(x.addressable_data(0))


def prefetch_to_device(batches: Iterator[dict[str, np.ndarray]], sharding: NamedSharding, size: int = 2
                       ) -> Iterator[dict[str, jax.Array]]:
  """Yields `global_batch(b, sharding)` for each host batch b, keeping `size` batches already sent to the devices
  ahead of the one yielded: the transfer of the next batches overlaps the step that runs now. Same batches, same
  order as the plain loop; `size` 0 transfers each batch only when it is asked for."""
  queue: collections.deque = collections.deque()
  iterator = iter(batches)

  def fill() -> None:
    while len(queue) <= size:
      try:
        queue.append(global_batch(next(iterator), sharding))
      except StopIteration:
        return

  fill()
  while queue:
    yield queue.popleft()
    fill()
