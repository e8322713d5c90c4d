"""One device mesh for everything, and the shardings of parameters, optimizer state and batches on it.

Axes ("data", "model"): the batch is split over "data"; the frozen backbone is replicated by default, or, with
`mesh.shard_backbone`, its large kernels are stored split over "model" (FSDP, for L/14 on small-memory chips): a step
then gathers each weight once, keeps it for the backward, and spreads its images over both axes (`GatherOnce`).
Prompts, fusion and optimizer state are tiny and replicated.

Input: a process loads the rows of each global batch that its devices hold, which is decided by the devices'
places on the "data" axis, not by the process index (`DataShard`, `data_shard`): with the model axis spanning
processes, several processes hold the same rows and must load the same ones. Batch fields that the data axis must
divide are rounded up to a multiple of it (`mcpf_jax.resolve.fit_batch`, one log line when a value changes).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import re
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mcpf_jax.resolve import mesh_shape

# Backbone leaves at least this large are sharded when mesh.shard_backbone is on (smaller ones stay replicated).
_MIN_SHARDED_SIZE = 2 ** 18
_BACKBONE = re.compile(r"^clip/")
_IN_STATE = re.compile(r"/(clip/.*)$")  # a backbone parameter's path inside an optimizer state's path
# Split leaves that GatherOnce leaves split: lookup tables (rows read by index, not multiplied).
GATHER_SKIPS = re.compile(r"token_embedding/")

log = logging.getLogger("mcpf_jax")


def make_mesh(data: int = -1, model: int = 1, devices: list[jax.Device] | None = None) -> Mesh:
  """A ("data", "model") mesh over all devices (of all processes); one size may be -1 = the rest."""
  devices = list(jax.devices() if devices is None else devices)
  data, model = mesh_shape(data, model, len(devices))
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


def text_rows_sharding(mesh: Mesh, both_axes: bool = False) -> NamedSharding:
  """The class-prompt rows of the text tower split over "data" (model.iqa.IQAModel.text_sharding), or over data x
  model (`both_axes`, with `GatherOnce`): each device encodes its share of the rows once per step instead of every
  row."""
  return NamedSharding(mesh, P(("data", "model") if both_axes else "data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


@dataclasses.dataclass(frozen=True)
class GatherOnce:
  """How a step uses a backbone stored split over "model" (`mesh.shard_backbone`): FSDP that gathers each weight once.

  Left to itself, XLA gathers a split weight at each use: in every image chunk, in the forward and again in the
  backward (L/14 MCPF on v5e-8 with model=2: 1,056 all-gathers, 20.4 GiB per device per step). Instead the step
  constrains the parameters to replicated once at its start (XLA then gathers each split weight for the forward and
  at most once more for the backward: 2.7 GiB there; a trainable one's gradient is reduce-scattered back by the same
  constraint's transpose), and spreads its rows over both axes, so the devices of a "model" group split the batch
  between them instead of computing the same rows twice. The weights' memory is then the whole backbone's during the
  step (the choice: the split copy is what the state, the checkpoints and the optimizer hold).
  """
  mesh: Mesh

  @property
  def rows(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(("data", "model")))

  def weights(self, tree: Any) -> Any:
    """`tree` with every leaf replicated, except the token embedding tables (`GATHER_SKIPS`): the class prompts
    read a few rows of them, which XLA looks up in place instead of gathering a 49,408-row table."""
    rep = replicated(self.mesh)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x if GATHER_SKIPS.search(jax.tree_util.keystr(path, simple=True, separator="/"))
        else jax.lax.with_sharding_constraint(x, rep), tree)

  def spread(self, tree: Any) -> Any:
    """Every array's leading (row) axis split over data x model (uneven counts are padded by XLA)."""
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
        x, NamedSharding(self.mesh, P(("data", "model"), *([None] * (x.ndim - 1))))), tree)


def gather_once(mesh: Mesh, shard_backbone: bool) -> GatherOnce | None:
  """The step's `GatherOnce` where the backbone is stored split (shard_backbone on a model axis above 1), else None."""
  return GatherOnce(mesh) if shard_backbone and mesh.shape["model"] > 1 else None


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


def state_shardings(state_shapes: Any, params_shardings: Any, mesh: Mesh, shard_backbone: bool = False) -> Any:
  """Shardings for the train state: params as given; the optimizer state of a split parameter (Adam's moments of a
  backbone that trains, with shard_backbone) split like it, so the update runs on each device's shard (ZeRO) and the
  state costs 1/model of its size; every other optimizer leaf (prompt-sized) and the step replicated."""
  rep = replicated(mesh)

  def opt_leaf(path, x) -> NamedSharding:
    found = _IN_STATE.search(jax.tree_util.keystr(path, simple=True, separator="/"))
    if found is None:
      return rep
    return NamedSharding(mesh, _leaf_spec(found.group(1), tuple(np.shape(x)), mesh, shard_backbone))

  return {"params": params_shardings, "opt": jax.tree_util.tree_map_with_path(opt_leaf, state_shapes["opt"]),
          "step": rep}


# ---------------------------------------------------------------------------------------------------------------
# Which rows of a batch a process loads, and batch sizes that the data axis divides.


@dataclasses.dataclass(frozen=True)
class DataShard:
  """The rows of every global batch that one process holds: block `index` of `count` equal, contiguous blocks.

  A process holds the rows its devices hold, which depends only on where they sit on the mesh's "data" axis.
  Processes whose devices sit at the same data positions (they differ along "model") hold the same block and load
  the same rows; `count` is the number of distinct blocks over all processes (1: every process holds the whole
  batch, e.g. mesh.data=1). In one process: DataShard(0, 1).
  """
  index: int
  count: int

  def local_size(self, field: str, batch_size: int) -> int:
    """Rows of a global batch of `batch_size` (the value of config field `field`) that this process loads."""
    if batch_size % self.count:
      raise ValueError(f"{field}={batch_size} must be divisible by the {self.count} data shards of the processes")
    return batch_size // self.count


def shard_of_positions(positions: Sequence[tuple[int, int]], num_positions: int, process: int) -> DataShard:
  """The DataShard of `process`, from where every device of the mesh sits (plain data, no devices needed).

  Args:
    positions: (process index, position on the data axis) of every device of the mesh.
    num_positions: the size of the data axis; position d holds rows [d * B / D, (d + 1) * B / D) of a batch of B.
    process: the process asked about.

  Raises:
    ValueError: when the processes' devices do not cover the data axis in equal, contiguous blocks (then no
      process-local loading can build the batch: jax would need rows from several places).
  """
  held: dict[int, set[int]] = collections.defaultdict(set)
  for proc, pos in positions:
    if not 0 <= pos < num_positions:
      raise ValueError(f"data position {pos} of a device of process {proc} is outside 0..{num_positions - 1}")
    held[proc].add(pos)
  if process not in held:
    raise ValueError(f"process {process} has no device on the mesh (processes with devices: {sorted(held)})")
  if set().union(*held.values()) != set(range(num_positions)):
    raise ValueError(f"the devices cover data positions {sorted(set().union(*held.values()))}, not all of "
                     f"0..{num_positions - 1}")
  blocks = {tuple(sorted(v)) for v in held.values()}
  size = len(held[process])
  for proc, v in sorted(held.items()):
    block = sorted(v)
    if len(block) != size or block != list(range(block[0], block[0] + size)):
      mine = f" and process {process}'s at {sorted(held[process])}" if proc != process else ""
      raise ValueError(
          f"process {proc}'s devices sit at data positions {block}{mine}: each process's devices must hold one "
          "contiguous block of the data axis, the same size for every process (build the mesh so that a "
          "process's devices are adjacent along 'data')")
  starts = sorted(b[0] for b in blocks)
  if starts != list(range(0, num_positions, size)):
    raise ValueError(f"the processes' data blocks {sorted(blocks)} do not tile the data axis (0..{num_positions - 1})"
                     ": two processes hold overlapping but different blocks")
  return DataShard(index=min(held[process]) // size, count=num_positions // size)


def data_shard(sharding: NamedSharding, process: int | None = None) -> DataShard:
  """This process's (or `process`'s) DataShard under the batch sharding, from its devices' data positions."""
  n = sharding.mesh.shape["data"]
  index_map = sharding.devices_indices_map((n,))
  positions = [(d.process_index, idx[0].start or 0) for d, idx in index_map.items()]
  return shard_of_positions(positions, n, jax.process_index() if process is None else process)


def rows_problem(shards: Sequence[int], rows: Sequence[np.ndarray]) -> str | None:
  """What is wrong with the rows that the processes pass for one global batch (None: nothing).

  shards[p]: process p's DataShard index; rows[p]: the source rows it passes, in order (-1: padding). Processes
  of one shard must pass the same rows; two shards passing the same rows means the shards were not told apart.
  """
  first: dict[int, int] = {}
  for p, (shard, r) in enumerate(zip(shards, rows)):
    q = first.setdefault(int(shard), p)
    if not np.array_equal(rows[q], r):
      return (f"processes {q} and {p} hold data shard {shard} (replicas along 'model') but pass different rows "
              f"({np.asarray(rows[q])[:4].tolist()}... vs {np.asarray(r)[:4].tolist()}...)")
  real = {s: rows[p] for s, p in first.items() if (np.asarray(rows[p]) >= 0).any()}
  for a in sorted(real):
    for b in sorted(real):
      if a < b and np.array_equal(real[a], real[b]):
        return f"data shards {a} and {b} pass the same rows {np.asarray(real[a])[:4].tolist()}..."
  return None


def check_rows(rows: np.ndarray, shard: DataShard, what: str) -> None:
  """Verifies across processes that this process's rows of a batch are the ones its data shard must pass
  (`rows_problem`): one small all-gather; a no-op in one process. Raises RuntimeError naming `what`."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  mine = np.concatenate([[shard.index], np.asarray(rows, np.int64)]).astype(np.int32)
  table = np.asarray(multihost_utils.process_allgather(mine))
  problem = rows_problem(table[:, 0], list(table[:, 1:]))
  if problem:
    raise RuntimeError(f"{what}: the processes' input does not match the batch sharding: {problem}")


def checked_first(batches: Iterator[dict[str, np.ndarray]], shard: DataShard, what: str
                  ) -> Iterator[dict[str, np.ndarray]]:
  """`batches` unchanged, the first one's `index` rows checked across processes first (`check_rows`)."""
  iterator = iter(batches)
  for first in iterator:
    check_rows(first["index"], shard, what)
    yield first
    break
  yield from iterator


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding, batch_size: int | None = None
                 ) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global jax.Arrays split over "data" (works on 1 and N hosts).

  `batch_size`: the global batch they belong to; jax then refuses rows that are not exactly this process's share
  (B / DataShard.count) instead of building a smaller batch from what each process happened to pass. None: the
  global size is inferred from the local one.
  """
  if batch_size is None:
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
  return {k: jax.make_array_from_process_local_data(sharding, v, (batch_size,) + v.shape[1:])
          for k, v in local.items()}


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


def prefetch_to_device(batches: Iterator[dict[str, np.ndarray]], sharding: NamedSharding, size: int = 2,
                       batch_size: int | None = None) -> Iterator[dict[str, jax.Array]]:
  """Yields `global_batch(b, sharding, batch_size)` for each host batch b, keeping `size` batches already sent to
  the devices ahead of the one yielded: the transfer of the next batches overlaps the step that runs now. Same
  batches, same order as the plain loop; `size` 0 transfers each batch only when it is asked for."""
  queue: collections.deque = collections.deque()
  iterator = iter(batches)

  def fill() -> None:
    while len(queue) <= size:
      try:
        queue.append(global_batch(next(iterator), sharding, batch_size))
      except StopIteration:
        return

  fill()
  while queue:
    yield queue.popleft()
    fill()
