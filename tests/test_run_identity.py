"""A run's identity (mcpf_jax.train.identity): config comparison, dataset fingerprints, split files, eval configs.

The end-to-end checks (refused restarts leave the workdir byte-identical, eval.py of a protocol split, init_from)
are in test_train_e2e.py; these are the pure functions under them.
"""

import json
import pathlib

import numpy as np
import pytest

from configs import base, smoke
from mcpf_jax import runs
from mcpf_jax.train import evaluation, identity


class FakeSource:
  """Just the columns dataset_identity reads (a built source has them as metadata arrays)."""

  def __init__(self, names, mos, contents, path="/data/smoke/1.0.0"):
    self.names, self.mos, self.content_ids, self.path = np.asarray(names), np.asarray(mos), np.asarray(contents), path


def test_every_compute_field_is_refused_and_free_fields_are_returned():
  saved = identity.config_dict(base.get_config())
  new = base.get_config()
  with new.unlocked():
    new.optim.lr = 1e-3
    new.model.fusion = "linear"
    new.model.quality_classes = ("bad", "good")
    new.train.log_every = 1
    new.mesh.data = 4
    new.data.data_dir = "/elsewhere"
  with pytest.raises(identity.RunMismatchError) as e:
    identity.compare(saved, new, "runs/x")
  msg = str(e.value)
  assert "3 field(s)" in msg
  assert "optim.lr: saved 0.002, now 0.001" in msg and 'model.fusion: saved null, now "linear"' in msg
  assert 'model.quality_classes: saved ["bad", "poor", "fair", "good", "perfect"], now ["bad", "good"]' in msg
  assert "log_every" not in msg and "--config.init_from=runs/x" in msg
  with new.unlocked():
    new.optim.lr, new.model.fusion, new.model.quality_classes = 2e-3, None, saved["model"]["quality_classes"]
  free = identity.compare(saved, new, "runs/x")
  assert {k for k, _, _ in free} == {"train.log_every", "mesh.data", "data.data_dir"}


def test_a_field_absent_on_one_side_is_a_difference():
  saved = identity.config_dict(base.get_config())
  del saved["loss"]["aux"]
  saved["model"]["new_field"] = 3
  diffs = {k: (a, b) for k, a, b in identity.differences(saved, base.get_config())}
  assert diffs == {"loss.aux": ("<absent>", 0.1), "model.new_field": (3, "<absent>")}
  with pytest.raises(identity.RunMismatchError, match="loss.aux: saved \"<absent>\", now 0.1"):
    identity.compare(saved, base.get_config(), "w")


@pytest.mark.parametrize("key,free", [
    ("train.log_every", True), ("train.checkpoint_every", True), ("train.keep", True), ("eval.batch_size", True),
    ("mesh.shard_backbone", True), ("clip.name", True), ("data.data_dir", True), ("clip.remat", True),
    ("train.batch_size", False), ("data.num_workers", True), ("eval.num_crops", False), ("seed", False),
    ("clip.dtype", False), ("init_from", False), ("meshy", False), ("clip.image_chunk", True),
    ("model.image_chunk", False), ("checkpoint_dir", True), ("clip.scan_layers", True),
])
def test_free_fields(key, free):
  assert identity.is_free(key) is free


def test_dataset_fingerprint_changes_with_any_row():
  names, mos, contents = ["a.png", "b.png", "c.png"], [1.0, 2.0, 3.0], ["a", "b", "b"]
  ref = identity.dataset_identity(FakeSource(names, mos, contents), "smoke")
  assert ref["num_records"] == 3 and ref["version"] == "1.0.0"
  assert identity.dataset_identity(FakeSource(names, mos, contents, path="/moved/1.0.0"), "smoke")["fingerprint"] \
      == ref["fingerprint"]
  for changed in (FakeSource(names, [1.0, 2.0, 3.5], contents), FakeSource(names[::-1], mos, contents),
                  FakeSource(names, mos, ["a", "b", "c"]), FakeSource(names[:2], mos[:2], contents[:2])):
    other = identity.dataset_identity(changed, "smoke")
    assert other["fingerprint"] != ref["fingerprint"]
    with pytest.raises(identity.RunMismatchError, match="fingerprint: saved"):
      identity.check_dataset(ref, other, "runs/x")
  identity.check_dataset(ref, dict(ref, path="/moved/1.0.0"), "runs/x")  # moved, same rows: fine


def test_split_file_round_trip_and_missing_names():
  config = smoke.get_config()
  names = np.asarray([f"img{i}.png" for i in range(6)])
  indices = {"train": np.array([0, 2, 4]), "val": np.array([5]), "test": np.array([1, 3])}
  record = identity.split_record(config, names, indices)
  assert record["test"] == ["img1.png", "img3.png"] and record["split_seed"] == 0
  shuffled = names[::-1]
  got = identity.indices_from_split(record, shuffled, "w")
  assert [shuffled[i] for i in got["test"]] == record["test"]
  with pytest.raises(identity.RunMismatchError, match="1 test image.*'img3.png'"):
    identity.indices_from_split(record, np.asarray([n for n in names if n != "img3.png"]), "w")


def test_write_is_atomic_and_read_back(tmp_path: pathlib.Path):
  identity.write(tmp_path, {"config": {"seed": 1}}, {"test": ["a"]})
  assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "split.json"]  # no temporary file left
  run, split = identity.read(tmp_path)
  assert run == {"config": {"seed": 1}} and split == {"test": ["a"]}
  assert identity.read(tmp_path / "nothing") is None
  (tmp_path / "run.json").write_text("{broken")
  with pytest.raises(identity.RunMismatchError, match="run.json: not valid JSON"):
    identity.read(tmp_path)


def test_eval_config_takes_the_run_and_only_eval_fields_from_the_command_line(caplog):
  run = smoke.get_config()
  with run.unlocked():
    run.data.split_seed = 3
    run.eval.num_crops = 5
  saved = identity.config_dict(run)
  given = smoke.get_config()  # the config file: split_seed 0, num_crops 9
  with given.unlocked():
    given.data.data_dir = "/moved"
  cfg = evaluation.eval_config(saved, given, explicit={"eval.batch_size": 4, "data.split_seed": 3})
  assert cfg.data.split_seed == 3  # the run's; an explicit override equal to it is fine
  assert cfg.eval.num_crops == 9 and cfg.data.data_dir == "/moved"  # evaluation and free fields apply
  assert "data.split_seed=0 (the run has 3)" in caplog.text
  assert evaluation.eval_config(saved, None).eval.num_crops == 5
  with pytest.raises(identity.RunMismatchError, match="data.split_seed: the run has 3, the command line asks for 0"):
    evaluation.eval_config(saved, given, explicit={"data.split_seed": 0})
  assert json.loads(evaluation.eval_config(saved, None).to_json())["model"] == saved["model"]


def test_configs_saved_before_a_rename_are_read_under_the_current_names(tmp_path):
  """run.json / checkpoint meta written before `splits` -> `num_splits`, `data.split` -> `data.split_protocol`,
  `model.image_chunk` -> `clip.image_chunk` (and with the retired `train.eval_every`) compare equal to today's
  config with the same values."""
  old = json.loads(base.get_config().to_json_best_effort())
  old["splits"] = old.pop("num_splits")
  old["data"]["split"] = old["data"].pop("split_protocol")
  old["model"]["image_chunk"] = old["clip"].pop("image_chunk")
  old["train"]["eval_every"] = 0
  assert runs.upgrade_config(old) == json.loads(base.get_config().to_json_best_effort())
  assert identity.differences(runs.upgrade_config(old), base.get_config()) == []
  (tmp_path / "run.json").write_text(json.dumps({"config": old}))
  assert runs.read_run(tmp_path)["config"]["data"]["split_protocol"] == "seed"
  assert runs.config_from_meta({"config": old}).num_splits == 1
  assert runs.upgrade_config({**old, "model": {**old["model"], "image_chunk": 4}})["clip"]["image_chunk"] == 4
