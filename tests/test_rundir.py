"""mcpf_jax.rundir: a run folder on a local disk and in a bucket (a real GCS-protocol server on localhost,
conftest's `gcs_server`), through one code path: atomic writes, reads, listing, the layout's names, where the
checkpoints go, and a clear refusal of a storage no run folder can be on.
"""

from __future__ import annotations

import json
import os
import pathlib

import pytest

from mcpf_jax import rundir, runs
from mcpf_jax.train import identity, reports


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path) -> str:
  """A run folder: a local one, or one in a fresh bucket."""
  if request.param == "local":
    return str(tmp_path / "run")
  bucket = request.getfixturevalue("gcs_bucket")
  return f"gs://{bucket}/runs/run"


def test_a_url_stays_a_url_and_a_local_path_is_expanded(monkeypatch, tmp_path):
  p = rundir.path("gs://bkt/runs/a")
  assert str(p) == "gs://bkt/runs/a" and str(p / "checkpoints") == "gs://bkt/runs/a/checkpoints"
  assert str(rundir.absolute("gs://bkt/runs/a")) == "gs://bkt/runs/a"
  assert rundir.is_remote("gs://bkt/x") and not rundir.is_remote(tmp_path)
  monkeypatch.setenv("HOME", str(tmp_path))
  assert str(rundir.path("~/runs/a")) == str(tmp_path / "runs" / "a")
  monkeypatch.chdir(tmp_path)
  assert str(rundir.absolute("runs/a")) == str(tmp_path / "runs" / "a")


@pytest.mark.parametrize("bad,why", [
    ("s3://bkt/run", r"s3://bkt/run: a run folder \(or checkpoint_dir\) on s3:// is not supported; use a local "
                     r"path or gs://bucket/path"),
    ("http://host/run", "on http:// is not supported"),
    ("gs://", "no bucket named; expected gs://bucket/path"),
])
def test_a_storage_no_run_can_be_on_is_refused_by_name(bad, why):
  with pytest.raises(ValueError, match=why):
    rundir.path(bad)
  with pytest.raises(ValueError, match=why):
    rundir.checkpoint_dir("runs/a", bad)


def test_checkpoint_dir_default_and_override(tmp_path):
  assert str(rundir.checkpoint_dir(tmp_path / "run")) == str(tmp_path / "run" / "checkpoints")
  assert str(rundir.checkpoint_dir("gs://b/run", "")) == "gs://b/run/checkpoints"
  assert str(rundir.checkpoint_dir(tmp_path / "run", "gs://other/ckpts")) == "gs://other/ckpts"
  assert str(rundir.checkpoint_dir("gs://b/run", str(tmp_path / "ckpts"))) == str(tmp_path / "ckpts")


def test_the_layout_names():
  # What every run folder holds, under the names the README, eval.py and the tests have always used.
  assert (rundir.RUN_FILE, rundir.SPLIT_FILE, rundir.CHECKPOINTS, rundir.TENSORBOARD, rundir.SUMMARY_FILE,
          rundir.TEST_PREDICTIONS_FILE, rundir.EVAL_FILE, rundir.EVAL_PREDICTIONS_FILE, rundir.EVAL_SCATTER_FILE,
          rundir.PROTOCOL_FILE, rundir.GENERATED_CLIP.format(name="tiny"), rundir.DATA) == (
              "run.json", "split.json", "checkpoints", "tensorboard", "train_summary.json", "test_predictions.csv",
              "eval.json", "eval_predictions.csv", "eval_scatter.png", "protocol.json", "tiny_clip", "data")
  assert identity.RUN_FILE == runs.RUN_FILE == rundir.RUN_FILE and identity.SPLIT_FILE == rundir.SPLIT_FILE


def test_write_read_list_on_local_disk_and_bucket(root):
  run = rundir.path(root)
  if not rundir.is_remote(root):
    run.mkdir(parents=True)
  assert rundir.read_json(run / rundir.RUN_FILE) is None
  rundir.write_json_atomic(run / rundir.RUN_FILE, {"config": {"seed": 1}})
  rundir.write_json_atomic(run / rundir.RUN_FILE, {"config": {"seed": 2}})  # replaced whole
  rundir.write_atomic(run / "split_0" / rundir.SPLIT_FILE, b'{"train": []}\n')
  reports.write_predictions(run / rundir.TEST_PREDICTIONS_FILE, {"name": ["a.png"], "mos": [1.5], "score": [2.25]})
  assert (run / rundir.RUN_FILE).read_text() == json.dumps({"config": {"seed": 2}}, indent=1) + "\n"
  assert runs.read_run(root)["config"] == {"seed": 2}
  assert rundir.read_json(run / "split_0" / rundir.SPLIT_FILE) == {"train": []}
  assert (run / rundir.TEST_PREDICTIONS_FILE).read_bytes() == b"name,mos,score\r\na.png,1.500000,2.250000\r\n"
  # Nothing but the files written: no temporary file left beside them.
  assert sorted(p.name for p in run.iterdir()) == ["run.json", "split_0", "test_predictions.csv"]
  assert (run / "split_0").is_dir() and (run / rundir.RUN_FILE).exists() and not (run / "nothing").exists()
  (run / rundir.EVAL_FILE).write_text("{not json")
  with pytest.raises(ValueError, match=r"eval.json: not valid JSON .*the file is damaged"):
    rundir.read_json(run / rundir.EVAL_FILE)


def test_identity_round_trip(root):
  run = rundir.path(root)
  if not rundir.is_remote(root):
    run.mkdir(parents=True)
  identity.write(run, {"config": {"seed": 0}, "dataset": {"name": "smoke"}}, {"train": ["a"], "val": [], "test": []})
  saved_run, saved_split = identity.read(root)
  assert saved_run["dataset"] == {"name": "smoke"} and saved_split["train"] == ["a"]


def test_a_bucket_url_never_becomes_a_local_folder(gcs_bucket, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  root = f"gs://{gcs_bucket}/run"
  rundir.write_json_atomic(rundir.path(root) / rundir.RUN_FILE, {"config": {}})
  assert runs.read_run(root) == {"config": {}}
  assert os.listdir(tmp_path) == []  # no ./gs:/bucket/run
  assert not pathlib.Path("gs:").exists()


def test_a_generated_backbone_of_a_run_in_a_bucket_is_a_local_folder_named_by_its_recipe(monkeypatch, tmp_path):
  monkeypatch.setenv(rundir.CACHE_ENV, str(tmp_path / "cache"))
  a = rundir.generated_backbone_dir("gs://b/run", "tiny", {"seed": 1, "width": 8})
  assert a.parent == tmp_path / "cache" / "tiny_clip"
  assert a == rundir.generated_backbone_dir("gs://other/run2", "tiny", {"width": 8, "seed": 1})
  assert a != rundir.generated_backbone_dir("gs://b/run", "tiny", {"seed": 2, "width": 8})
  assert rundir.generated_backbone_dir("gs://b/run", "other", {"seed": 1, "width": 8}).parent.name == "other_clip"
  assert rundir.generated_backbone_dir(tmp_path / "run", "tiny", {"seed": 1}) == tmp_path / "run" / "tiny_clip"
