"""Which rows of a batch each process loads, batch sizes fitted to the mesh, and evaluation's padding.

The shard arithmetic (mcpf_jax.train.mesh.shard_of_positions) is a pure function of where the devices sit, so the
meshes of pods are tested here as plain data: a fake layout lists (process, data position) for every device, the
way jax.make_mesh lays devices out (device ids in process order, reshaped to [data, model]). Each layout's answer is
checked against the rows that its devices hold, derived device by device, and the pipeline's shards are joined
into global batches the way jax.make_array_from_process_local_data does, to be compared with one process's batches.
"""

import io
import logging

import jax
import ml_collections
import numpy as np
import PIL.Image
import pytest

from configs import base
from mcpf_jax import images, resolve, scores
from mcpf_jax.data import pipeline
from mcpf_jax.train import evaluation
from mcpf_jax.train import mesh as mesh_lib

S = 16  # crop side


def _layout(processes: int, per_process: int, data: int, model: int, order=None) -> list[tuple[int, int]]:
  """(process, data position) of every device of a [data, model] mesh over processes x per_process devices.

  Device d belongs to process d // per_process; `order` (default: by id) is the device ids in mesh order."""
  ids = np.arange(processes * per_process) if order is None else np.asarray(order)
  grid = ids.reshape(data, model)
  return [(int(d) // per_process, pos) for pos in range(data) for d in grid[pos]]


def _rows_of_devices(layout, data: int, process: int, batch: int) -> list[int]:
  """The rows of a global batch that `process`'s devices hold, device by device (position d: rows
  [d * batch / data, (d + 1) * batch / data)), in the order jax wants them from the process (by row)."""
  k = batch // data
  return sorted({r for p, d in layout if p == process for r in range(d * k, (d + 1) * k)})


# (processes, devices per process, data, model) -> the DataShard (index, count) of every process.
LAYOUTS = {
    (1, 8, 8, 1): [(0, 1)],
    (1, 8, 2, 4): [(0, 1)],
    (2, 2, 4, 1): [(0, 2), (1, 2)],  # tests/test_multiprocess.py's "two"
    (2, 1, 1, 2): [(0, 1), (0, 1)],  # the model axis spans the processes: both hold the whole batch
    (2, 1, 2, 1): [(0, 2), (1, 2)],
    (2, 2, 1, 4): [(0, 1), (0, 1)],
    (2, 2, 2, 2): [(0, 2), (1, 2)],
    (4, 2, 2, 4): [(0, 2), (0, 2), (1, 2), (1, 2)],  # pairs of processes share a data shard
    (4, 2, 4, 2): [(0, 4), (1, 4), (2, 4), (3, 4)],
    (4, 2, 8, 1): [(0, 4), (1, 4), (2, 4), (3, 4)],
    (4, 2, 1, 8): [(0, 1)] * 4,
    (8, 4, 4, 8): [(i // 2, 4) for i in range(8)],  # v5e-32 with mesh.model=8
    (8, 4, 32, 1): [(i, 8) for i in range(8)],  # v5e-32, data parallel
    (16, 4, 8, 8): [(i // 2, 8) for i in range(16)],
}


@pytest.mark.parametrize("shape", list(LAYOUTS), ids=lambda s: "{}x{}_data{}_model{}".format(*s))
def test_data_shard_of_each_process_is_the_rows_its_devices_hold(shape):
  processes, _, data, _ = shape
  layout = _layout(*shape)
  batch = 4 * data
  shards = [mesh_lib.shard_of_positions(layout, data, p) for p in range(processes)]
  assert [(s.index, s.count) for s in shards] == LAYOUTS[shape]
  for p, shard in enumerate(shards):
    k = shard.local_size("train.batch_size", batch)
    assert list(range(shard.index * k, (shard.index + 1) * k)) == _rows_of_devices(layout, data, p, batch)


def test_a_layout_that_no_process_local_loading_can_build_is_refused():
  # Devices 0..3 of 2 processes in the mesh order 0, 2, 1, 3: process 0 holds data positions 0 and 2.
  interleaved = _layout(2, 2, 4, 1, order=[0, 2, 1, 3])
  with pytest.raises(ValueError, match=r"process 0's devices sit at data positions \[0, 2\].*contiguous block"):
    mesh_lib.shard_of_positions(interleaved, 4, 0)
  uneven = [(0, 0), (0, 1), (1, 2), (2, 3)]
  with pytest.raises(ValueError, match="the same size for every process"):
    mesh_lib.shard_of_positions(uneven, 4, 1)
  overlapping = [(0, 0), (0, 1), (1, 1), (1, 2), (2, 2), (2, 3)]
  with pytest.raises(ValueError, match="do not tile the data axis"):
    mesh_lib.shard_of_positions(overlapping, 4, 0)
  with pytest.raises(ValueError, match="process 5 has no device on the mesh"):
    mesh_lib.shard_of_positions(_layout(2, 2, 4, 1), 4, 5)
  with pytest.raises(ValueError, match=r"cover data positions \[0, 1\], not all of 0..3"):
    mesh_lib.shard_of_positions([(0, 0), (1, 1)], 4, 0)
  with pytest.raises(ValueError, match="must be divisible by the 2 data shards"):
    mesh_lib.DataShard(0, 2).local_size("eval.batch_size", 5)


def test_data_shard_of_this_process_from_the_real_batch_sharding():
  mesh = mesh_lib.make_mesh()
  assert mesh_lib.data_shard(mesh_lib.batch_sharding(mesh)) == mesh_lib.DataShard(0, 1)


def test_rows_problem_names_replicas_that_disagree_and_shards_told_apart_wrongly():
  a, b = np.array([3, 7]), np.array([5, 1])
  assert mesh_lib.rows_problem([0, 0, 1, 1], [a, a, b, b]) is None
  assert "processes 0 and 1 hold data shard 0" in mesh_lib.rows_problem([0, 0, 1, 1], [a, b, b, b])
  # Every process loaded as if it were shard 0 of 2: the two shards pass the same rows.
  assert "data shards 0 and 1 pass the same rows" in mesh_lib.rows_problem([0, 1], [a, a])
  # Two shards of nothing but padding (a short evaluation) are not a problem.
  pad = np.array([-1, -1])
  assert mesh_lib.rows_problem([0, 1, 2], [a, pad, pad]) is None


def _png(rgb, h=20, w=24) -> bytes:
  buf = io.BytesIO()
  PIL.Image.fromarray(np.broadcast_to(np.uint8(rgb), (h, w, 3)).copy()).save(buf, format="PNG")
  return buf.getvalue()


@pytest.fixture(scope="module")
def records():
  rng = np.random.default_rng(0)
  return [{"image": _png(rng.integers(0, 256, 3), 20 + i % 3, 24), "name": f"img{i:02d}.png", "mos": 1.0 + i}
          for i in range(11)]


@pytest.fixture(scope="module")
def score_map(records):
  return scores.ScoreMap.fit([r["mos"] for r in records], higher_is_better=True)


def _join(shard_batches, shards):
  """The global batch jax builds from each process's rows: shard blocks in index order (one process per shard)."""
  by_index = {}
  for batch, shard in zip(shard_batches, shards):
    if shard.index in by_index:  # a replica: must hold the same rows
      np.testing.assert_array_equal(by_index[shard.index]["index"], batch["index"])
    by_index[shard.index] = batch
  return {k: np.concatenate([by_index[i][k] for i in sorted(by_index)]) for k in shard_batches[0]}


@pytest.mark.parametrize("shape", [(4, 2, 2, 4), (2, 1, 1, 2), (4, 2, 8, 1)],
                         ids=lambda s: "{}x{}_data{}_model{}".format(*s))
def test_processes_loading_their_data_shards_build_the_one_process_batches(records, score_map, shape):
  processes, _, data, _ = shape
  layout = _layout(*shape)
  batch = resolve.fit_batch("train.batch_size", 3, data)
  args = dict(batch_size=batch, image_size=S, resize=20, seed=1, score_map=score_map, num_epochs=1,
              max_upscale=None)
  reference = list(pipeline.train_loader(records, range(len(records)), **args))
  shards = [mesh_lib.shard_of_positions(layout, data, p) for p in range(processes)]
  streams = [list(pipeline.train_loader(records, range(len(records)), shard_index=s.index, shard_count=s.count,
                                        **args)) for s in shards]
  assert len(reference) == len(records) // batch
  for step, ref in enumerate(reference):
    joined = _join([stream[step] for stream in streams], shards)
    for k in ref:
      np.testing.assert_array_equal(joined[k], ref[k], err_msg=f"step {step}, {k}")


def test_batch_sizes_are_rounded_up_to_a_multiple_of_the_data_axis(caplog):
  with caplog.at_level(logging.INFO, logger="mcpf_jax"):
    assert resolve.fit_batch("eval.batch_size", 16, 32) == 32
  assert [r.getMessage() for r in caplog.records] == [
      "eval.batch_size=16 -> 32: rounded up to a multiple of the mesh's data axis (32 devices)"]
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="mcpf_jax"):
    assert resolve.fit_batch("train.batch_size", 32, 8) == 32  # divides already: unchanged, nothing logged
    assert resolve.fit_batch("train.batch_size", 32, 1) == 32
    assert resolve.fit_batch("train.batch_size", 32, 8, accumulate_steps=4) == 32
  assert not caplog.records
  with caplog.at_level(logging.INFO, logger="mcpf_jax"):
    assert resolve.fit_batch("train.batch_size", 32, 64) == 64
    assert resolve.fit_batch("train.batch_size", 48, 32, accumulate_steps=3) == 96
  assert "x train.accumulate_steps (3)" in caplog.records[-1].getMessage()
  with pytest.raises(ValueError, match=r"train.batch_size=32 must be divisible by train.accumulate_steps \(5\)"):
    resolve.fit_batch("train.batch_size", 32, 8, accumulate_steps=5)
  with pytest.raises(ValueError, match="eval.batch_size=0 must be at least 1"):
    resolve.fit_batch("eval.batch_size", 0, 8)


def test_resolve_returns_a_copy_with_fitted_batches():
  config = base.get_config()  # resolve() checks a training config against the schema: a whole one
  config.mesh.update(data=-1, model=1)
  config.train.update(batch_size=6, accumulate_steps=2)
  config.eval.batch_size = 5
  data = jax.device_count()
  fitted = resolve.resolve(config)
  assert fitted is not config and (config.train.batch_size, config.eval.batch_size) == (6, 5)
  assert fitted.train.batch_size == -(-6 // (2 * data)) * 2 * data
  assert fitted.eval.batch_size == -(-5 // data) * data


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_eval_padding_is_never_scored_and_every_image_is_scored_once(records, score_map, count):
  batch = resolve.fit_batch("eval.batch_size", 3, count)  # one device per shard
  local = mesh_lib.DataShard(0, count).local_size("eval.batch_size", batch)
  indices = np.array([10, 0, 3, 7, 1, 9, 2, 8, 4, 6, 5])
  streams = [list(pipeline.eval_batches(records, indices, batch_size=local, image_size=S, resize=20, num_crops=2,
                                        score_map=score_map, shard_index=i, shard_count=count))
             for i in range(count)]
  assert len({len(s) for s in streams}) == 1  # every shard runs the same number of global batches
  table = evaluation.ScoreTable(indices)
  padding = 0
  for step in range(len(streams[0])):
    glob = _join([s[step] for s in streams], [mesh_lib.DataShard(i, count) for i in range(count)])
    padding += int((glob["weight"] == 0).sum())
    # A padding row's score is NaN: were it ever scored, the result would not be finite.
    table.add(np.where(glob["weight"] > 0, glob["index"] * 0.5, np.nan), glob["index"], glob["weight"])
  assert int(table.scored.sum()) == len(indices)
  np.testing.assert_array_equal(table.result(), indices * 0.5)
  assert padding == len(streams[0]) * batch - len(indices)


def test_score_table_refuses_missing_repeated_and_unknown_images():
  table = evaluation.ScoreTable(np.array([4, 5, 6]))
  table.add(np.array([0.1, 0.2, 0.0]), np.array([4, 5, -1]), np.array([1, 1, 0]))
  with pytest.raises(RuntimeError, match="1 images were not scored"):
    table.result()
  with pytest.raises(RuntimeError, match="scored image 5 twice"):
    table.add(np.array([0.3]), np.array([5]), np.array([1]))
  with pytest.raises(RuntimeError, match="image 9, which is not one of the images evaluated"):
    table.add(np.array([0.3]), np.array([9]), np.array([1]))
  table.add(np.array([np.nan]), np.array([6]), np.array([1]))
  with pytest.raises(evaluation.NonFiniteError, match="1 of 3 predicted scores are not finite"):
    table.result()


def test_predict_scores_every_image_once_through_a_padded_last_batch(records, score_map):
  """Evaluator.predict end to end on this process's devices, with a batch that the images do not fill: the score
  of each image is its crops' mean pixel, computed here from images.eval_crops."""
  mesh = mesh_lib.make_mesh()
  config = ml_collections.ConfigDict({"eval": {"batch_size": 4, "num_crops": 2},
                                      "data": {"resize": 20, "num_workers": 0}})
  data = type("RunData", (), {"source": records, "score_map": score_map})()
  eval_fn = jax.jit(lambda params, batch: batch["image"].astype(np.float32).mean(axis=(1, 2, 3, 4)) + params)
  indices = np.array([9, 2, 5, 0, 7, 3, 10])  # 7 images, batches of 4: one padding row
  got = evaluation.Evaluator(config, data, S, eval_fn, mesh_lib.batch_sharding(mesh)).predict(0.0, indices)
  expected = [images.eval_crops(records[i]["image"], records[i]["name"], resize=20, image_size=S, num_crops=2,
                                max_upscale=None)[0].astype(np.float32).mean() for i in indices]
  np.testing.assert_allclose(got, expected, rtol=1e-6)
