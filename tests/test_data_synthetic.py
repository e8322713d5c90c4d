"""Synthetic-distortion releases from their real label files: LIVE (779 of 982), CSIQ (866), TID2013 (3000) at full
size; KADID-10k's 10125 rows counted from the real dmos.csv, built on a slice of it."""

import math
import shutil

import data_fakes
import numpy as np
import pytest
import scipy.io

import mcpf_jax.data as data
from mcpf_jax.data import layouts, problems


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
  path = data_fakes.fast_tmp(tmp_path_factory, "synthetic")
  yield path
  shutil.rmtree(path, ignore_errors=True)


def _build(name, root, out, **kwargs):
  data.builder(name, data_dir=out, **kwargs).download_and_prepare(download_config=data_fakes.manual(root))
  return data.source(name, data_dir=out)


# --- LIVE release 2 -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live_expected(test_data):
  """{name: (realigned DMOS, std, reference)} from dmos_realigned.mat and pyiqa's list of the 779 distorted images."""
  labels = test_data / "labels"
  mat = scipy.io.loadmat(labels / "live_release2" / "dmos_realigned.mat")
  names = [f"{d}/img{k}.bmp" for d, n in data_fakes.LIVE_FOLDERS for k in range(1, n + 1)]
  refs = {r["dist_name"]: r["ref_name"].split("/")[-1]
          for r in data_fakes.read_csv(labels / "pyiqa_meta_info" / "meta_info_LIVEIQADataset.csv")}
  return {n: (mat["dmos_new"][0, k], mat["dmos_std"][0, k], refs[n]) for k, n in enumerate(names) if n in refs}


def test_live_779_distorted_images(test_data, tmp, live_expected):
  root = data_fakes.live(tmp / "live_a", test_data / "labels")
  src = _build("live", root, tmp / "live_a" / "tfds", liqe_dir=test_data / "labels" / "liqe_splits")
  assert len(src) == len(live_expected) == 779
  for i in range(len(src)):
    rec = src[i]
    dmos, std, ref = live_expected[rec["name"]]
    assert rec["mos"] == np.float32(dmos) and rec["mos_std"] == np.float32(std)
    assert rec["content_id"] == ref
  assert src[0]["image"] == (root / src[0]["name"]).read_bytes()
  meta = src.metadata
  assert meta["higher_is_better"] is False and meta["mos_kind"] == "DMOS" and meta["num_contents"] == 29
  assert meta["excluded"] == {"reference copies (orgs = 1)": 203}
  # Realigned DMOS has no fixed scale (it goes below 0 and above 100): the observed range is the range.
  assert meta["mos_range_source"] == "observed" and meta["mos_range"][0] < 0 < 100 < meta["mos_range"][1]
  # labels/live_release2/refnames_all.mat is a re-indexed 779-entry copy and its `orgs` is truncated: the builder
  # falls back to the folders' info.txt and to (dmos_new == 0 and dmos_std == 0).
  assert meta["notes"]["reference_source"] == "info.txt"
  assert meta["notes"]["orgs_source"].startswith("dmos_realigned.mat: dmos_new == 0")
  liqe = data_fakes.liqe_labels(test_data / "labels" / "liqe_splits" / "databaserelease2")
  assert meta["has_distortion"] == 779
  for i in range(0, 779, 13):
    rec = src[i]
    assert rec["distortion"] == liqe[rec["name"]][0]
    np.testing.assert_array_equal(rec["scene"], liqe[rec["name"]][1])


def test_live_official_refnames_and_original_dmos(test_data, tmp, live_expected):
  root = data_fakes.live(tmp / "live_b", test_data / "labels", official_refnames=True)
  (root / "jp2k" / "info.txt").unlink()  # the official 1x982 refnames_all.mat is enough
  src = _build("live", root, tmp / "live_b" / "tfds", decode_check="none")
  assert len(src) == 779
  assert src.metadata["notes"]["reference_source"] == "refnames_all.mat"
  assert [live_expected[n][2] for n in src.names] == list(src.content_ids)
  # dmos.mat in the official layout (`dmos`, `orgs`: 1x982), rebuilt from pyiqa's original DMOS of the 779
  # distorted images; dmos=original reads it (orgs from the file, no std, range 0-100).
  original = {r["dist_name"]: float(r["mos"])
              for r in data_fakes.read_csv(test_data / "labels" / "pyiqa_meta_info" / "meta_info_LIVEIQADataset.csv")}
  names = [f"{d}/img{k}.bmp" for d, n in data_fakes.LIVE_FOLDERS for k in range(1, n + 1)]
  scipy.io.savemat(root / "dmos.mat", {"dmos": np.array([[original.get(n, 0.0) for n in names]]),
                                       "orgs": np.array([[float(n not in original) for n in names]])})
  src = _build("live", root, tmp / "live_b" / "tfds_original", decode_check="none", dmos="original")
  assert len(src) == 779
  np.testing.assert_array_equal(src.mos, np.float32([original[n] for n in src.names]))
  assert all(math.isnan(src[i]["mos_std"]) for i in range(0, 779, 50))
  meta = src.metadata
  assert meta["notes"]["orgs_source"] == "dmos.mat:orgs" and meta["notes"]["mos_column"] == "dmos"
  assert meta["mos_range"] == [0.0, 100.0] and meta["mos_range_source"] == "nominal"


def test_live_modified_refnames_without_info_txt_is_an_error(test_data, tmp):
  root = data_fakes.live(tmp / "live_c", test_data / "labels")
  (root / "wn" / "info.txt").unlink()
  with pytest.raises(problems.DatasetError, match=r"refnames_all.mat has 779 names, but the official file has 982.*"
                     r"wn/info.txt is missing"):
    layouts.Live().read(root, problems.ProblemLog("live", False))


# --- CSIQ ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("official_xlsx", [False, True])
def test_csiq_866(test_data, tmp, official_xlsx):
  sub = tmp / f"csiq_{official_xlsx}"
  root = data_fakes.csiq(sub, test_data / "labels", official_xlsx=official_xlsx)
  src = _build("csiq", root, sub / "tfds", liqe_dir=test_data / "labels" / "liqe_splits",
               decode_check="full" if official_xlsx else "verify")
  expected = {f"dst_imgs/{data_fakes.CSIQ_FOLDER[n.split('.')[1]]}/{n}": d
              for n, d in data_fakes.csiq_label_rows(test_data / "labels")}
  assert len(src) == len(expected) == 866
  assert set(src.names) == set(expected)
  for i in range(len(src)):
    rec = src[i]
    assert rec["mos"] == np.float32(expected[rec["name"]])
    assert rec["content_id"] == rec["name"].split("/")[-1].split(".")[0] + ".png"
    if official_xlsx:
      assert rec["mos_std"] == np.float32(expected[rec["name"]] / 10)
    else:
      assert math.isnan(rec["mos_std"])
  meta = src.metadata
  assert meta["num_contents"] == 30 and meta["higher_is_better"] is False and meta["mos_range"] == [0.0, 1.0]
  assert meta["notes"]["label_file"] == ("csiq.DMOS.xlsx" if official_xlsx else "csiq_label.txt")
  assert meta["has_distortion"] == 866 and meta["has_scene"] == 866  # LIQE's CSIQ files cover all 866


# --- TID2013 ------------------------------------------------------------------------------------------------------


def test_tid2013_3000(test_data, tmp):
  root = data_fakes.tid2013(tmp, test_data / "labels")
  src = _build("tid2013", root, tmp / "tid_tfds", decode_check="verify")
  lines = (root / "mos_with_names.txt").read_text().splitlines()
  stds = (root / "mos_std.txt").read_text().splitlines()
  assert len(src) == len(lines) == 3000
  for i in range(0, 3000, 7):
    mos, name = lines[i].split()
    rec = src[i]
    assert rec["name"] == f"distorted_images/{name}"
    assert rec["mos"] == np.float32(mos) and rec["mos_std"] == np.float32(stds[i])
    assert rec["content_id"] == "I" + name[1:3]
  assert src.metadata["num_contents"] == 25 and src.metadata["higher_is_better"] is True
  assert not src[0]["has_scene"] and not src[0]["has_distortion"]


# --- KADID-10k ----------------------------------------------------------------------------------------------------


def test_kadid10k_counts_all_10125_rows(test_data, tmp):
  root = data_fakes.kadid(tmp / "kadid_count", test_data / "labels", images=False)
  listing = layouts.Kadid10k().read(root, problems.ProblemLog("kadid10k", False))
  assert len(listing.rows) == 10125
  assert len({r.content_id for r in listing.rows}) == 81
  assert len(listing.not_rated) == 81  # the reference images in images/ are not examples


def test_kadid10k_slice(test_data, tmp):
  root = data_fakes.kadid(tmp / "kadid", test_data / "labels", select=slice(3, None, 41))
  src = _build("kadid10k", root, tmp / "kadid" / "tfds", liqe_dir=test_data / "labels" / "liqe_splits")
  rows = data_fakes.read_csv(root / "dmos.csv")
  assert len(src) == len(rows) == 247
  liqe = data_fakes.liqe_labels(test_data / "labels" / "liqe_splits" / "kadid10k")
  for i, r in enumerate(rows):
    rec = src[i]
    assert rec["name"] == f"images/{r['dist_img']}" and rec["content_id"] == r["ref_img"]
    assert rec["mos"] == np.float32(r["dmos"])
    assert rec["mos_std"] == np.float32(math.sqrt(float(r["var"])))  # `var` is a variance
    assert rec["distortion"] == liqe[rec["name"]][0]
  assert src.metadata["higher_is_better"] is True and src.metadata["mos_range"] == [1.0, 5.0]
  assert src.metadata["skipped"] == 0  # the reference images in images/ are not reported as unlabelled
