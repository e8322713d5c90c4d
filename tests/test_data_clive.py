"""The 55-entry LIVE Challenge miniature builds with its 48 test images, exact MOS, exact bytes and LIQE labels."""

import json
import os
import pathlib
import pickle
import subprocess
import sys

import data_fakes
import numpy as np
import pytest
import scipy.io

import mcpf_jax.data as data
from mcpf_jax.data import builders

REPO = pathlib.Path(__file__).resolve().parents[1]

@pytest.fixture(scope="module")
def built(test_data, tmp_path_factory):
  out = tmp_path_factory.mktemp("clive_tfds")
  b = data.builder("livec", data_dir=out, liqe_dir=test_data / "labels" / "liqe_splits")
  b.download_and_prepare(download_config=data_fakes.manual(test_data / "clive-mini" / "ChallengeDB_release"))
  return out


def _mat_entries(release: pathlib.Path) -> dict[str, tuple[float, float]]:
  names = scipy.io.loadmat(release / "Data" / "AllImages_release.mat")["AllImages_release"]
  mos = scipy.io.loadmat(release / "Data" / "AllMOS_release.mat")["AllMOS_release"][0]
  std = scipy.io.loadmat(release / "Data" / "AllStdDev_release.mat")["AllStdDev_release"][0]
  return {str(names[k, 0][0]): (mos[k], std[k]) for k in range(names.shape[0])}


def test_48_test_images_with_mat_scores_and_original_bytes(built, test_data):
  release = test_data / "clive-mini" / "ChallengeDB_release"
  entries = _mat_entries(release)
  assert len(entries) == 55
  src = data.source("livec", data_dir=built)
  assert len(src) == 48
  test_names = {n for n in entries if not n.startswith("t")}
  seen = set()
  for i in range(len(src)):
    r = src[i]
    base = r["name"].removeprefix("Images/")
    assert r["name"] == f"Images/{base}" and base in test_names
    assert r["image"] == (release / "Images" / base).read_bytes()
    assert r["mos"] == np.float32(entries[base][0]) and r["mos"].dtype == np.float32
    assert r["mos_std"] == np.float32(entries[base][1])
    assert r["content_id"] == r["name"] and r["official_split"] == "" and r["index"] == i
    seen.add(base)
  assert seen == test_names  # t1..t7 excluded, nothing else dropped
  # Records keep the .mat order.
  mat_order = [n for n in entries if n in test_names]
  assert [n.removeprefix("Images/") for n in src.names] == mat_order
  np.testing.assert_array_equal(src.mos, np.float32([entries[n][0] for n in mat_order]))


def test_liqe_labels_joined_where_listed(built, test_data):
  expected = data_fakes.liqe_labels(test_data / "labels" / "liqe_splits" / "ChallengeDB_release")
  src = data.source("livec", data_dir=built)
  for i in range(len(src)):
    r = src[i]
    assert r["name"] in expected  # every CLIVE test image is in LIQE's clive_all_clip.txt
    dist, hot = expected[r["name"]]
    assert r["has_distortion"] and r["distortion"] == dist
    assert r["has_scene"]
    np.testing.assert_array_equal(r["scene"], hot)
  meta = data.info("livec", data_dir=built)
  assert meta["liqe"]["matched"] == 48 and meta["has_scene"] == 48


def test_metadata(built, test_data):
  meta = data.info("livec", data_dir=built)
  assert meta["higher_is_better"] is True and meta["mos_kind"] == "MOS" and meta["mos_range"] == [0.0, 100.0]
  assert meta["content_kind"] == "image" and meta["num_examples"] == 48 and meta["num_contents"] == 48
  assert meta["excluded"] == {"training images t1..t7 (Images/trainingImages/)": 7}
  assert meta["skipped"] == 0 and meta["official_splits"] == {}
  assert "index" not in meta
  assert meta["mos_observed"] == [pytest.approx(3.42), pytest.approx(92.4319526627219)]
  assert set(meta["label_files"]) == {"Data/AllImages_release.mat", "Data/AllMOS_release.mat",
                                      "Data/AllStdDev_release.mat"}


def test_source_pickles_and_subsets(built):
  src = data.source("livec", data_dir=built)
  again = pickle.loads(pickle.dumps(src))
  assert len(again) == 48 and again[7]["image"] == src[7]["image"]
  sub = src.subset([5, 2])
  assert len(sub) == 2 and sub[0]["index"] == 5 and sub[1]["name"] == src[2]["name"]
  assert list(sub.content_ids) == [src[5]["content_id"], src[2]["content_id"]]
  assert [r["index"] for r in src.__getitems__([3, 1])] == [3, 1]
  with pytest.raises(IndexError):
    src[48]
  with pytest.raises(ValueError, match="no part 'test'"):
    data.source("livec", data_dir=built, part="test")


def test_no_tensorflow_needed(built):
  # Building and reading ran in this process; TensorFlow must not have been imported for it.
  src = data.source("livec", data_dir=built)
  assert src[0]["image"]
  assert "tensorflow" not in sys.modules


def test_prepare_cli_prints_one_json_line(test_data, tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.run(
      [sys.executable, "-m", "mcpf_jax.data.prepare", "livec", "--manual_dir",
       str(test_data / "clive-mini" / "ChallengeDB_release"), "--data_dir", str(tmp_path),
       "--decode_check", "verify"],
      capture_output=True, text=True, env=env, check=False, timeout=300)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert len(lines) == 1, proc.stdout
  summary = json.loads(lines[0])
  assert summary["dataset"] == "livec" and summary["num_examples"] == 48 and summary["skipped"] == 0
  assert pathlib.Path(summary["data_dir"]) == tmp_path / "livec" / builders.DATASET_VERSION
  assert len(data.source("livec", data_dir=tmp_path)) == 48


def test_prepare_cli_wrong_folder_exits_1(test_data, tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.run(
      [sys.executable, "-m", "mcpf_jax.data.prepare", "livec", "--manual_dir", str(test_data / "clive-mini"),
       "--data_dir", str(tmp_path)], capture_output=True, text=True, env=env, check=False, timeout=300)
  assert proc.returncode == 1 and proc.stdout == ""
  assert "expected Data/AllImages_release.mat" in proc.stderr
  # The folder may be reached through a symlink; the message names it as given or resolved.
  expected = test_data / "clive-mini" / "ChallengeDB_release"
  assert (f"did you mean {expected}?" in proc.stderr or f"did you mean {expected.resolve()}?" in proc.stderr)
