"""KonIQ-10k from its real label file: all 10073 images (full-size build), the official split, LIQE labels, and the
official download's csv name."""

import shutil

import data_fakes
import numpy as np
import pytest

import mcpf_jax.data as data


@pytest.fixture(scope="module")
def release(test_data, tmp_path_factory):
  tmp = data_fakes.fast_tmp(tmp_path_factory, "koniq")
  root = data_fakes.koniq(tmp, test_data / "labels")
  # "verify" (PIL structure check) keeps this 10k-image build fast; the full decode runs in the other builds.
  b = data.builder("koniq10k", data_dir=tmp / "tfds", decode_check="verify",
                   liqe_dir=test_data / "labels" / "liqe_splits")
  b.download_and_prepare(download_config=data_fakes.manual(root))
  yield root, tmp / "tfds"
  shutil.rmtree(tmp, ignore_errors=True)


def test_all_rows_scores_bytes_and_official_split(release, test_data):
  root, out = release
  rows = data_fakes.read_csv(test_data / "labels" / "koniq10k" / "koniq10k_distributions_sets.csv")
  src = data.source("koniq10k", data_dir=out)
  assert len(src) == len(rows) == 10073
  assert list(src.names) == [f"1024x768/{r['image_name']}" for r in rows]
  np.testing.assert_array_equal(src.mos, np.float32([float(r["MOS"]) for r in rows]))
  assert list(src.official_split) == [r["set"] for r in rows]
  for i in np.random.default_rng(0).choice(len(rows), 100, replace=False):
    rec, row = src[int(i)], rows[int(i)]
    assert rec["name"] == f"1024x768/{row['image_name']}" == rec["content_id"]
    assert rec["mos"] == np.float32(row["MOS"]) and rec["mos_std"] == np.float32(row["SD"])
    assert rec["official_split"] == row["set"]
    assert rec["image"] == (root / rec["name"]).read_bytes()
  meta = data.info("koniq10k", data_dir=out)
  assert meta["official_splits"] == {"training": 7058, "validation": 1000, "test": 2015}
  assert meta["higher_is_better"] and meta["mos_range"] == [0.0, 100.0] and meta["num_contents"] == 10073
  assert meta["notes"]["label_file"] == "koniq10k_distributions_sets.csv"
  test = data.source("koniq10k", data_dir=out, part="test")
  assert len(test) == 2015 and set(test.official_split) == {"test"}
  assert test[0]["official_split"] == "test"


def test_liqe_labels(release, test_data):
  _, out = release
  expected = data_fakes.liqe_labels(test_data / "labels" / "liqe_splits" / "koniq-10k")
  assert len(expected) == 10073
  src = data.source("koniq10k", data_dir=out)
  assert data.info("koniq10k", data_dir=out)["has_distortion"] == 10073
  for i in range(0, len(src), 97):
    rec = src[i]
    dist, hot = expected[rec["name"]]
    assert rec["has_distortion"] and rec["distortion"] == dist and rec["has_scene"]
    np.testing.assert_array_equal(rec["scene"], hot)


@pytest.mark.parametrize("sets_too", [False, True])
def test_official_download_csv(test_data, tmp_path_factory, sets_too):
  tmp = data_fakes.fast_tmp(tmp_path_factory, "koniq_official")
  try:
    root = data_fakes.koniq(tmp, test_data / "labels", select=slice(0, 10073, 37), official_name=True,
                            sets_too=sets_too)
    b = data.builder("koniq10k", data_dir=tmp / "tfds")
    b.download_and_prepare(download_config=data_fakes.manual(root))
    rows = data_fakes.read_csv(root / "koniq10k_scores_and_distributions.csv")
    src = data.source("koniq10k", data_dir=tmp / "tfds")
    assert len(src) == len(rows) == 273
    # The official file's 0-100 column (MOS_zscore) is the score, so both csv variants give the same scale.
    np.testing.assert_array_equal(src.mos, np.float32([float(r["MOS_zscore"]) for r in rows]))
    meta = data.info("koniq10k", data_dir=tmp / "tfds")
    assert meta["notes"]["label_file"] == "koniq10k_scores_and_distributions.csv"
    assert meta["notes"]["mos_column"] == "MOS_zscore"
    if sets_too:
      sets = {r["image_name"]: r["set"] for r in data_fakes.read_csv(root / "koniq10k_distributions_sets.csv")}
      assert list(src.official_split) == [sets[r["image_name"]] for r in rows]
    else:
      assert set(src.official_split) == {""} and meta["official_splits"] == {}
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
