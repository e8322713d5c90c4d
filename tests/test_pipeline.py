"""Tests of the grain input pipeline (mcpf_jax.data.pipeline) on a plain list source of tiny encoded images.

The training images are lossless PNGs whose short side equals `resize` (no resampling), with pixel values that
encode their coordinates (R = row, G = column), so the position and the flip of every crop can be read back
from the crop itself.
"""

import io
import json
import pickle

import numpy as np
import PIL.Image
import pytest

from mcpf_jax import images, scores
from mcpf_jax.data import pipeline

S = 16        # crop side
RESIZE = 24   # short side after resizing


def _png(img: np.ndarray) -> bytes:
  buf = io.BytesIO()
  PIL.Image.fromarray(img).save(buf, format="PNG")
  return buf.getvalue()


def _coordinate_image(h: int, w: int, image_id: int) -> np.ndarray:
  """uint8 [h, w, 3]: R = row, G = column, B = image id."""
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  return np.stack([rows, cols, np.full_like(rows, image_id)], axis=-1).astype(np.uint8)


def _source(n: int = 12) -> list[dict]:
  """n records, short side RESIZE (landscape and portrait), MOS 1..5, every third with scene/distortion labels."""
  src = []
  for i in range(n):
    h, w = (RESIZE, RESIZE + 2 * i) if i % 2 == 0 else (RESIZE + 3 * i, RESIZE)
    rec = {"image": _png(_coordinate_image(h, w, i)), "name": f"img{i:02d}.png", "mos": 1.0 + 4.0 * i / (n - 1),
           "mos_std": 0.1 * i}
    if i % 3 == 0:
      scene = np.zeros(9, bool)
      scene[i % 9] = True
      rec.update(scene=scene, has_scene=True, distortion=i % 11, has_distortion=True)
    src.append(rec)
  return src


@pytest.fixture(scope="module")
def source() -> list[dict]:
  return _source()


@pytest.fixture(scope="module")
def score_map(source) -> scores.ScoreMap:
  return scores.ScoreMap.fit([r["mos"] for r in source], higher_is_better=True)


def _train(source, score_map, **kwargs):
  indices = kwargs.pop("indices", range(len(source)))
  args = dict(batch_size=4, image_size=S, resize=RESIZE, seed=0, score_map=score_map, num_epochs=3)
  args.update(kwargs)
  return pipeline.train_loader(source, indices, **args)


def _same(a: list[dict], b: list[dict]) -> bool:
  return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k], equal_nan=True)
                                                             for k in x) for x, y in zip(a, b))


def _crop_geometry(crop: np.ndarray) -> tuple[int, int, bool]:
  """(top, left, flipped) of a crop of a coordinate image."""
  flipped = bool(crop[0, 0, 1] > crop[0, -1, 1])
  left = int(crop[0, -1, 1] if flipped else crop[0, 0, 1])
  return int(crop[0, 0, 0]), left, flipped


def test_train_batch_shapes_and_dtypes(source, score_map):
  batch = next(iter(_train(source, score_map)))
  expect = {"image": ((4, S, S, 3), np.uint8), "mos": ((4,), np.float32), "mos01": ((4,), np.float32),
            "mos_std01": ((4,), np.float32), "level": ((4,), np.int32), "scene": ((4, 9), np.float32),
            "has_scene": ((4,), np.float32), "distortion": ((4,), np.int32), "has_distortion": ((4,), np.float32),
            "index": ((4,), np.int64)}
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expect


def test_train_crops_are_windows_of_the_image_and_flip_about_half(source, score_map):
  batches = list(_train(source, score_map, num_epochs=4))
  assert len(batches) == 4 * 3  # 12 rows / 4 per batch, 4 epochs
  flips = []
  for batch in batches:
    for crop, row in zip(batch["image"], batch["index"]):
      full = _coordinate_image(*images.decode(source[row]["image"]).shape[:2], int(row))
      top, left, flipped = _crop_geometry(crop)
      assert 0 <= top <= full.shape[0] - S and 0 <= left <= full.shape[1] - S
      window = full[top:top + S, left:left + S]
      np.testing.assert_array_equal(crop, window[:, ::-1] if flipped else window)
      flips.append(flipped)
  # 48 crops: a fair coin gives 12..36 heads with probability > 0.999; the seed fixes the outcome anyway.
  assert 12 <= sum(flips) <= 36


def test_train_labels_follow_the_records(source, score_map):
  for batch in _train(source, score_map, num_epochs=1):
    for j, row in enumerate(batch["index"]):
      rec = source[row]
      assert batch["mos"][j] == np.float32(rec["mos"])
      # Records hold float32 scores (as mcpf_jax.data sources do); the pipeline reads them as float32.
      assert batch["mos01"][j] == score_map.mos01(np.float32(rec["mos"]))
      np.testing.assert_allclose(batch["mos_std01"][j], rec["mos_std"] / (score_map.high - score_map.low), rtol=1e-6)
      assert batch["level"][j] == score_map.level(np.float32(rec["mos"]))
      if "scene" in rec:
        np.testing.assert_array_equal(batch["scene"][j], rec["scene"].astype(np.float32))
        assert batch["has_scene"][j] == 1 and batch["has_distortion"][j] == 1
        assert batch["distortion"][j] == rec["distortion"]
      else:
        assert not batch["scene"][j].any() and batch["has_scene"][j] == 0
        assert batch["distortion"][j] == 0 and batch["has_distortion"][j] == 0


def test_missing_std_is_nan(score_map):
  src = [{"image": _png(_coordinate_image(RESIZE, RESIZE, i)), "mos": float(i)} for i in range(4)]
  batch = next(iter(_train(src, score_map)))
  assert np.isnan(batch["mos_std01"]).all()


def test_same_seed_same_batches_other_seed_other_batches(source, score_map):
  a = list(_train(source, score_map))
  b = list(_train(source, score_map))
  c = list(_train(source, score_map, seed=1))
  assert _same(a, b)
  assert not np.array_equal(np.stack([x["index"] for x in a]), np.stack([x["index"] for x in c]))


def test_each_epoch_visits_every_row_once_in_a_new_order(source, score_map):
  batches = list(_train(source, score_map))
  epochs = [np.concatenate([b["index"] for b in batches[3 * e:3 * e + 3]]) for e in range(3)]
  for order in epochs:
    assert sorted(order.tolist()) == list(range(len(source)))
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
  # The same row gets another crop or flip in another epoch.
  crops = {}
  for b in batches:
    for crop, row in zip(b["image"], b["index"]):
      crops.setdefault(int(row), []).append(_crop_geometry(crop))
  assert any(len(set(g)) > 1 for g in crops.values())


def test_remainder_is_dropped_and_indices_select_rows(source, score_map):
  indices = [1, 3, 4, 6, 7, 9, 10]
  batches = list(_train(source, score_map, indices=indices, num_epochs=2))
  assert len(batches) == 2 * pipeline.steps_per_epoch(7, 4) == 2
  assert set(np.concatenate([b["index"] for b in batches]).tolist()) <= set(indices)


def test_resume_from_iterator_state_mid_epoch(source, score_map):
  it = iter(_train(source, score_map))
  for _ in range(4):  # into the second epoch
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # the state must survive a JSON checkpoint
  rest = list(it)
  resumed = iter(_train(source, score_map))
  resumed.set_state(state)
  assert len(rest) == 5 and _same(list(resumed), rest)


class _CountingSource(list):
  """A list source that records which rows were read (decoded) from it."""

  def __init__(self, records):
    super().__init__(records)
    self.reads: list[int] = []

  def __getitem__(self, i):
    self.reads.append(int(i))
    return super().__getitem__(i)


def test_shards_get_their_rows_of_each_global_batch_and_decode_only_those(score_map):
  records = _source(13)
  reference = list(_train(records, score_map, batch_size=4, num_epochs=2))
  assert len(reference) == 2 * pipeline.steps_per_epoch(13, 4) == 6
  parts = []
  for shard in range(2):
    src = _CountingSource(records)
    batches = list(_train(src, score_map, batch_size=4, num_epochs=2, shard_index=shard, shard_count=2))
    assert len(batches) == 6 and all(len(b["index"]) == 2 for b in batches)
    # This process read exactly the rows it yields, nothing of the other process's half.
    assert sorted(src.reads) == sorted(int(i) for b in batches for i in b["index"])
    parts.append(batches)
  for g, (a, b) in enumerate(zip(*parts)):
    joined = {k: np.concatenate([a[k], b[k]]) for k in a}
    assert _same([joined], [reference[g]]), f"global batch {g}: the two processes' halves are not the batch"
  with pytest.raises(ValueError, match=r"global batch_size 5 must be divisible by the number of data shards "
                                       r"\(shard_count=2\)"):
    _train(records, score_map, batch_size=5, shard_count=2)


def test_start_batch_continues_the_stream_on_any_number_of_processes(score_map):
  records = _source(13)
  reference = list(_train(records, score_map, batch_size=4, num_epochs=3))
  assert _same(list(_train(records, score_map, batch_size=4, num_epochs=3, start_batch=4)), reference[4:])
  halves = [list(_train(records, score_map, batch_size=4, num_epochs=3, start_batch=4, shard_index=p, shard_count=2))
            for p in range(2)]
  joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*halves)]
  assert _same(joined, reference[4:])


def test_workers_and_threads_give_the_same_batches_and_resume(source, score_map):
  reference = list(_train(source, score_map, num_epochs=2))
  assert _same(list(_train(source, score_map, num_epochs=2, num_threads=3)), reference)
  it = iter(_train(source, score_map, num_epochs=2, num_workers=2))
  try:
    head = [next(it) for _ in range(2)]
    state = it.get_state()
    tail = list(it)
  finally:
    it.close()
  assert _same(head + tail, reference)
  resumed = iter(_train(source, score_map, num_epochs=2, num_workers=2))
  try:
    resumed.set_state(state)
    assert _same(list(resumed), reference[2:])
  finally:
    resumed.close()


def test_decode_error_names_the_row_and_file(source, score_map):
  bad = list(source)
  bad[5] = dict(bad[5], image=b"not an image at all")
  with pytest.raises(pipeline.RecordError, match=r"row 5 \(img05\.png\).*cannot decode"):
    list(_train(bad, score_map, num_epochs=1))
  with pytest.raises(pipeline.RecordError, match=r"row 5 \(img05\.png\)"):
    list(pipeline.eval_batches(bad, range(8), batch_size=4, image_size=S, resize=RESIZE, num_crops=2,
                               score_map=score_map))


def test_small_images_are_resized_up_within_max_upscale(score_map):
  src = [{"image": _png(_coordinate_image(14, 20, 0)), "name": "small.png", "mos": 2.0},
         {"image": _png(_coordinate_image(10, 12, 1)), "name": "tiny.png", "mos": 3.0}]
  batch = next(iter(_train(src, score_map, indices=[0], batch_size=1)))
  assert batch["image"].shape == (1, S, S, 3)  # 14 px -> 24 px short side (1.7x), then a 16 px crop
  with pytest.raises(pipeline.RecordError, match=r"row 1 \(tiny\.png\).*max_upscale") as refused:
    next(iter(_train(src, score_map, indices=[1], batch_size=1)))
  # A training run cannot pass the Python argument: the advice is in a run's terms.
  assert "--config.data.resize" in str(refused.value) and "max_upscale=None" not in str(refused.value)
  batch = next(iter(_train(src, score_map, indices=[1], batch_size=1, max_upscale=None)))
  assert batch["image"].shape == (1, S, S, 3)


def test_argument_errors(source, score_map):
  with pytest.raises(ValueError, match="resize"):
    _train(source, score_map, resize=S - 1)
  with pytest.raises(ValueError, match="fewer than batch_size"):
    _train(source, score_map, batch_size=14)
  with pytest.raises(IndexError, match="rows 0..11"):
    _train(source, score_map, indices=[0, 12])
  with pytest.raises(ValueError, match="shard_index"):
    _train(source, score_map, shard_index=2, shard_count=2)


def _eval(source, score_map, indices, **kwargs):
  args = dict(batch_size=4, image_size=S, resize=20, num_crops=3, score_map=score_map)
  args.update(kwargs)
  return list(pipeline.eval_batches(source, indices, **args))


def test_eval_crops_are_the_grid_crops_and_the_last_batch_is_padded(source, score_map):
  indices = [0, 1, 2, 3, 5, 8, 11]
  batches = _eval(source, score_map, indices)
  assert len(batches) == pipeline.num_eval_batches(7, 4) == 2
  for b in batches:
    assert b["image"].shape == (4, 3, S, S, 3) and b["image"].dtype == np.uint8
    assert b["weight"].dtype == np.float32 and b["index"].dtype == np.int64
  np.testing.assert_array_equal(np.concatenate([b["weight"] for b in batches]), [1] * 7 + [0])
  np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches]), indices + [-1])
  assert not batches[-1]["image"][-1].any() and batches[-1]["mos01"][-1] == 0
  for b in batches:
    for crops, row, weight in zip(b["image"], b["index"], b["weight"]):
      if not weight:
        continue
      # Independent of the pipeline: decode, resize (24 -> 20 px short side: real resampling), grid crops.
      img = images.resize_short_side(images.decode(source[row]["image"]), 20)
      expected = [images.crop(img, t, l, S) for t, l in images.grid_crop_positions(*img.shape[:2], S, 3)]
      np.testing.assert_array_equal(crops, np.stack(expected))
  assert batches[0]["mos01"][1] == score_map.mos01(np.float32(source[1]["mos"]))


def test_eval_is_repeatable_and_workers_do_not_change_it(source, score_map):
  a = _eval(source, score_map, range(12), batch_size=5)
  assert _same(a, _eval(source, score_map, range(12), batch_size=5))
  assert [b["weight"].sum() for b in a] == [5, 5, 2]


def test_eval_shards_cover_the_rows_with_equal_batch_counts(source, score_map):
  seen, counts = [], []
  for shard in range(3):
    src = _CountingSource(source)
    batches = _eval(src, score_map, range(11), batch_size=2, shard_index=shard, shard_count=3)
    counts.append(len(batches))
    mine = [int(i) for b in batches for i, w in zip(b["index"], b["weight"]) if w]
    assert sorted(src.reads) == sorted(mine) == list(range(shard, 11, 3))  # each image decoded by one process
    seen += mine
  assert counts == [pipeline.num_eval_batches(11, 2, shard_count=3)] * 3 == [2, 2, 2]
  assert sorted(seen) == list(range(11))


def test_score_map_mos():
  lt = scores.ScoreMap.fit([1.0, 2.0, 5.0, 3.0], higher_is_better=True)
  assert (lt.low, lt.high, lt.train_low01, lt.train_high01) == (1.0, 5.0, 0.0, 1.0)
  np.testing.assert_allclose(lt.mos01([1.0, 3.0, 5.0]), [0.0, 0.5, 1.0])
  # Five equal bins of width 0.8 over [1, 5]; the maximum is in the top bin, test values outside are clipped.
  np.testing.assert_array_equal(lt.level([1.0, 1.79, 1.81, 3.0, 4.99, 5.0, 0.0, 7.0]), [0, 0, 1, 2, 4, 4, 0, 4])
  # Edges written in decimal but stored as float32 (1.8 -> 1.79999995, 4.2 -> 4.19999981) are on the edge.
  np.testing.assert_array_equal(lt.level(np.float32([1.8, 2.6, 3.4, 4.2])), [1, 2, 3, 4])
  np.testing.assert_allclose(lt.mos_std01(0.4), 0.1)
  assert np.isnan(lt.mos_std01(np.nan))
  np.testing.assert_allclose(lt.to_mos(lt.mos01([1.3, 4.2, 6.0])), [1.3, 4.2, 6.0])


def test_score_map_dmos_is_flipped_once():
  # LIVE-like DMOS: 0 is pristine (best). The training split spans [10, 60] of a nominal [0, 100] scale.
  lt = scores.ScoreMap.fit([10.0, 60.0, 35.0], higher_is_better=False, mos_range=(0.0, 100.0))
  assert not lt.higher_is_better
  np.testing.assert_allclose(lt.mos01([0.0, 10.0, 60.0, 100.0]), [1.0, 0.9, 0.4, 0.0], atol=1e-7)
  assert (lt.train_low01, lt.train_high01) == pytest.approx((0.4, 0.9))
  # Bins on the TRAINING range [0.4, 0.9] of mos01: DMOS 60 is the worst level, DMOS 10 the best.
  np.testing.assert_array_equal(lt.level([60.0, 48.0, 35.0, 10.0, 0.0, 100.0]), [0, 1, 2, 4, 4, 0])
  np.testing.assert_allclose(lt.to_mos([1.0, 0.4]), [0.0, 60.0], atol=1e-9)
  # The std scales by the nominal range, never flips.
  np.testing.assert_allclose(lt.mos_std01(5.0), 0.05)


def test_score_map_errors_and_pickling():
  with pytest.raises(ValueError, match="non-finite"):
    scores.ScoreMap.fit([1.0, np.nan], True)
  with pytest.raises(ValueError, match="all 2 training scores equal"):
    scores.ScoreMap.fit([3.0, 3.0], True)
  with pytest.raises(ValueError, match="outside mos_range"):
    scores.ScoreMap.fit([0.5, 3.0], True, mos_range=(1.0, 5.0))
  lt = scores.ScoreMap.fit([1.0, 5.0], True, num_levels=3)
  assert pickle.loads(pickle.dumps(lt)) == lt


def test_input_sizes_follow_the_host_cores():
  # Below 4 cores: the main process decodes, one read thread per core; from 4: cores - 1 workers (at most 32).
  assert pipeline.input_sizes(cores=2) == (0, 2)
  assert pipeline.input_sizes(cores=1) == (0, 1)
  assert pipeline.input_sizes(cores=4) == (3, 1)
  assert pipeline.input_sizes(cores=224) == (32, 1)
  assert pipeline.input_sizes(2, pipeline.AUTO, cores=16) == (2, 1)
  assert pipeline.input_sizes(0, pipeline.AUTO, cores=16) == (0, 16)
  assert pipeline.input_sizes(5, 3, cores=2) == (5, 3)
  with pytest.raises(ValueError, match=r"num_workers must be >= 0, or -1 to size it from the host's cores; got -2"):
    pipeline.input_sizes(-2)
  # Prefetch: one batch per thread at least, else 64 MiB of batches, at most 8.
  assert pipeline.prefetch_batches(32 * 224 * 224 * 3, 1) == 8
  assert pipeline.prefetch_batches(16 * 15 * 224 * 224 * 3, 1) == 1
  assert pipeline.prefetch_batches(16 * 15 * 224 * 224 * 3, 4) == 4
