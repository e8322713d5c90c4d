"""Tests of the built-in smoke data (mcpf_jax.smoke.data): real photos, known distortion levels, real formats."""

import csv
import itertools
import pathlib

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

import mcpf_jax.data
from mcpf_jax import images, scores
from mcpf_jax.data import pipeline, splits
from mcpf_jax.smoke import data as smoke

SHORT = 64  # a small short side keeps the tests fast; the default is 256


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory) -> pathlib.Path:
  folder = tmp_path_factory.mktemp("smoke")
  smoke.write_smoke_dataset(folder, short_side=SHORT)
  return folder


def _rows(folder: pathlib.Path) -> list[dict]:
  with open(folder / smoke.CSV_NAME, newline="") as f:
    return list(csv.DictReader(f))


def _pixels(folder: pathlib.Path, rel: str) -> np.ndarray:
  return images.load(folder / rel).astype(np.float64)


def test_rows_levels_and_mos(smoke_dir):
  rows = _rows(smoke_dir)
  assert list(rows[0]) == list(smoke.CSV_COLUMNS)
  assert len(rows) == len(smoke.PHOTOS) * (1 + 3 * smoke.NUM_LEVELS) == 192
  for r in rows:
    assert float(r["mos"]) == pytest.approx(5.0 - 0.8 * int(r["level"]))
    assert r["path"].startswith(f"images/{r['content_id']}_")
    assert (r["level"] == "0") == (r["distortion"] == "pristine")
  assert {r["content_id"] for r in rows} == set(smoke.PHOTOS)
  for photo in smoke.PHOTOS:
    mine = [r for r in rows if r["content_id"] == photo]
    assert sorted((r["distortion"], int(r["level"])) for r in mine) == sorted(
        [("pristine", 0)] + [(d, k) for d in smoke.DISTORTIONS for k in range(1, 6)])


def test_files_are_real_images_of_the_given_size(smoke_dir):
  for r in _rows(smoke_dir):
    with PIL.Image.open(smoke_dir / r["path"]) as img:
      assert img.format == ("JPEG" if r["distortion"] == "jpeg" else "PNG")
      assert min(img.size) == SHORT
      # Gray photos stay gray files; colour photos are RGB.
      assert img.mode == ("L" if r["content_id"] in ("camera", "coins", "grass", "moon") else "RGB")


def test_distortions_grow_with_the_level(smoke_dir):
  for photo in ("astronaut", "coins"):
    pristine = _pixels(smoke_dir, f"images/{photo}_pristine.png")
    # Blur removes high frequencies: the mean absolute horizontal gradient falls with the level.
    sharp = [np.abs(np.diff(_pixels(smoke_dir, f"images/{photo}_blur{k}.png"), axis=1)).mean() for k in range(1, 6)]
    assert all(a > b for a, b in zip([np.abs(np.diff(pristine, axis=1)).mean()] + sharp, sharp))
    # Noise: the residual's std follows the nominal std (less where clipping at 0 / 255 bites).
    noise = [np.std(_pixels(smoke_dir, f"images/{photo}_noise{k}.png") - pristine) for k in range(1, 6)]
    assert all(a < b for a, b in itertools.pairwise(noise))
    assert noise[0] == pytest.approx(smoke.NOISE_STDS[0], rel=0.1)
    # JPEG: the error against the pristine image grows as the quality falls.
    err = [np.abs(_pixels(smoke_dir, f"images/{photo}_jpeg{k}.jpg") - pristine).mean() for k in range(1, 6)]
    assert all(a < b for a, b in itertools.pairwise(err))


def test_deterministic(smoke_dir, tmp_path):
  smoke.write_smoke_dataset(tmp_path, short_side=SHORT, photos=("chelsea", "moon"))
  again = _rows(tmp_path)
  assert len(again) == 32
  for r in again:
    assert (tmp_path / r["path"]).read_bytes() == (smoke_dir / r["path"]).read_bytes(), r["path"]
  assert again == [r for r in _rows(smoke_dir) if r["content_id"] in ("chelsea", "moon")]


def test_unknown_photo_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="unknown smoke photos.*'lena'"):
    smoke.write_smoke_dataset(tmp_path, photos=("astronaut", "lena"))


def test_builds_as_a_csv_dataset_and_feeds_the_pipeline(smoke_dir, tmp_path):
  data_dir = tmp_path / "tfds"
  builder = mcpf_jax.data.builder("csv", data_dir=data_dir, config_name="smoke", **smoke.CSV_CONFIG)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(smoke_dir)))
  src = mcpf_jax.data.source("csv", data_dir=data_dir, config="smoke")
  rows = _rows(smoke_dir)
  assert len(src) == len(rows)
  by_name = {r["path"]: r for r in rows}
  for i in (0, 17, len(src) - 1):
    rec = src[i]
    assert rec["image"] == (smoke_dir / rec["name"]).read_bytes()
    assert rec["mos"] == np.float32(by_name[rec["name"]]["mos"])
    assert rec["content_id"] == by_name[rec["name"]]["content_id"]

  # Split by photo (the project's split code), fit score_map on the training side, run both loaders.
  train_idx, test_idx = splits.split_indices(src.content_ids, seed=0)
  assert not set(src.content_ids[train_idx]) & set(src.content_ids[test_idx])
  score_map = scores.ScoreMap.fit(src.mos[train_idx], higher_is_better=True, mos_range=smoke.MOS_RANGE)
  batch = next(iter(pipeline.train_loader(src, train_idx, batch_size=8, image_size=32, resize=SHORT, seed=0,
                                          score_map=score_map)))
  assert batch["image"].shape == (8, 32, 32, 3) and set(batch["index"].tolist()) <= set(train_idx.tolist())
  np.testing.assert_allclose(batch["mos01"], (src.mos[batch["index"]] - 1.0) / 4.0, atol=1e-6)
  # Distortion level d (mos 5 - 0.8 d) -> quality level min(5 - d, 4): the six smoke scores sit exactly on the
  # edges of the five bins over [1, 5], stored as float32 (1.8 is 1.79999995).
  distortion_level = np.rint((5.0 - src.mos[batch["index"]]) / 0.8)
  np.testing.assert_array_equal(batch["level"], np.minimum(5 - distortion_level, 4))
  evals = list(pipeline.eval_batches(src, test_idx, batch_size=16, image_size=32, resize=SHORT, num_crops=3,
                                     score_map=score_map))
  assert sum(b["weight"].sum() for b in evals) == len(test_idx)
  assert evals[0]["image"].shape == (16, 3, 32, 32, 3)
