"""End to end: train.py and eval.py on the smoke config, run as subprocesses the way people run them.

Checks the multi-device and resume contract: the same held-out scores on 8 simulated devices as on 1 (relative
difference <= 1e-3), exact resume after SIGKILL (<= 1e-5), checkpoints along the run (last K + the best by validation
SRCC), the non-finite guard, the 10-split protocol runner (here 2 splits), TensorBoard scalars, the progress bar and
a log without orbax's INFO chatter; and a run's identity: restarts with a changed config or a rebuilt dataset are
refused and leave the workdir byte-identical, an allowed change resumes, eval.py of a protocol split scores that
split's own test images (with and without --config), and init_from starts from another run's weights.

Cost: every run is the smoke run cut to one epoch (9 steps of 16 images, a checkpoint every 3 steps). The runs
go in two lanes of subprocesses started once per module (module fixture `runs`): lane 1 runs the 1-device run,
its evaluation, the killed and resumed run and the protocol; lane 2 the 8-device run and the non-finite run.
The 1-device run and its evaluation are the session's (conftest `e2e_shared`, also test_multiprocess's baseline,
made by whichever module asks first); the restarts that must be refused go to a copy of it. All share one smoke
dataset and the session's JAX persistent compilation cache, so identical programs (the 1-device train and eval
steps of the plain, resumed and protocol runs) are compiled once. Measured
on 2 shared cores (load ~5): ~215 s wall, ~235 s CPU in all before the identity runs (~360 s wall with them:
each refused start ~5 s CPU, init_from ~36 s); the 1-device run ~48 s CPU (half of it compiling
the train step), the 8-device run ~62 s, the non-finite run ~30 s (lr is a compile-time constant). The module's
teardown prints each run's wall and CPU time (`pytest -s`).
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import shutil
import signal
import struct
import time

import e2e_support as e2e
import jax
import numpy as np
import pytest

pytestmark = pytest.mark.slow

# orbax modules that log INFO lines at every save / restore (absl's log prefix names the file).
# No line anchor: tqdm's carriage-return updates put a progress bar in front of some log lines.
ORBAX_INFO = re.compile(r"I\d{4} [\d:.]+ +\d+ (checkpoint_manager|async_checkpointer|composite_checkpoint_handler)"
                        r"\.py:\d+\]")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, e2e_shared) -> e2e.Runs:
  root = tmp_path_factory.mktemp("e2e")
  start = time.perf_counter()
  commands = e2e.Commands(root, e2e_shared.data())
  commands.timings["smoke data (shared)"] = (time.perf_counter() - start, math.nan)

  def train(name, **kw):
    return lambda: commands.run(name, "train.py", root / name.split(":")[0], **kw)

  def evaluate(name, **kw):
    return lambda: commands.run(name, "eval.py", root / name.split(":")[0], **kw)

  split_1 = root / "protocol" / "split_1"
  lane1 = e2e.Lane([
      # The session's shared run (test_multiprocess compares to it too): read only; the restarts go to a copy.
      ("one", e2e_shared.one),
      ("one:eval", e2e_shared.one_eval),
      ("one:refused", lambda: _refused_restarts(commands, e2e_shared.one_dir, root / "one_copy",
                                                root / "data_rebuilt")),
      ("resumed:killed", train("resumed:killed", kill_after_checkpoint=True)),
      # An allowed change on restart (how often to log) resumes.
      ("resumed", train("resumed", overrides={"train.log_every": 1})),
      ("resumed:eval", evaluate("resumed:eval", extra=("--verbosity=0",))),
      ("protocol", train("protocol", overrides={"num_splits": 2, "train.checkpoint_every": 9})),
      # The config file says data.split_seed=0; split 1 must still be evaluated on its own test images.
      ("split_1:eval", lambda: commands.run("split_1:eval", "eval.py", split_1, extra=("--checkpoint=latest",))),
      ("split_1:eval-noconfig", lambda: commands.run("split_1:eval-noconfig", "eval.py", split_1,
                                                      extra=("--checkpoint=latest",), config_file=False)),
  ])
  lane2 = e2e.Lane([
      ("eight", train("eight", overrides={"mesh.data": 8}, devices=8)),
      ("eight:eval", evaluate("eight:eval", overrides={"mesh.data": 8}, devices=8)),
      ("nonfinite", train("nonfinite", overrides={"optim.lr": 1e30, "train.checkpoint_every": 1})),
      # A new run from "one"'s trained weights; lr 0 keeps them, so its checkpoint holds what step 0 started from.
      ("init", lambda: (lane1.futures["one"].result(timeout=3 * e2e.TIMEOUT_S),
                        commands.run("init", "train.py", root / "init",
                                     {"init_from": e2e_shared.one_dir, "init_from_checkpoint": "latest",
                                      "optim.lr": 0.0,
                                      "train.num_epochs": 1, "optim.total_steps": 3}))[1]),
  ])
  yield e2e.Runs(commands, [lane1, lane2])
  for lane in (lane1, lane2):
    lane.thread.join(timeout=3 * e2e.TIMEOUT_S)
  e2e.report_timings(commands, start, "end-to-end runs (two lanes in parallel)")


# Restarts of the finished run "one" that must be refused before anything is touched: (name, overrides, field).
REFUSED = (
    ("split_seed", {"data.split_seed": 1}, "data.split_seed", "0", "1"),
    ("batch_size", {"train.batch_size": 8}, "train.batch_size", "16", "8"),
    ("lr", {"optim.lr": 1e-3}, "optim.lr", "0.003", "0.001"),
    ("fusion", {"model.fusion": "linear"}, "model.fusion", "null", '"linear"'),
    ("resize", {"data.resize": 128}, "data.resize", "256", "128"),
)


def _rebuilt_smoke_data(original: pathlib.Path, out: pathlib.Path) -> None:
  """The smoke dataset rebuilt from its release folder with other rows: one image's MOS changed."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from mcpf_jax import data  # pylint: disable=g-import-not-at-top
  from mcpf_jax.smoke import data as smoke  # pylint: disable=g-import-not-at-top
  release = out / "smoke_release"
  shutil.copytree(original / "smoke_release", release)
  csv_path = release / smoke.CSV_NAME
  lines = csv_path.read_text().splitlines()
  header = lines[0].split(",")
  row = lines[1].split(",")
  row[header.index("mos")] = "4.5"  # was 5 (a pristine photo)
  csv_path.write_text("\n".join([lines[0], ",".join(row)] + lines[2:]) + "\n")
  data.builder("csv", data_dir=out, config_name="smoke", **smoke.CSV_CONFIG).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(release)))


def _refused_restarts(commands: e2e.Commands, finished: pathlib.Path, workdir: pathlib.Path,
                      rebuilt: pathlib.Path) -> dict:
  """Restarts a copy (`workdir`) of the finished run `finished` with each REFUSED change and with a rebuilt
  dataset (train and eval)."""
  shutil.copytree(finished, workdir)
  before = e2e.tree_digest(workdir)
  out = {name: commands.run(f"one:refused-{name}", "train.py", workdir, overrides)
         for name, overrides, *_ in REFUSED}
  _rebuilt_smoke_data(commands.data_dir, rebuilt)
  out["rebuilt:train"] = commands.run("one:rebuilt-train", "train.py", workdir, {"data.data_dir": rebuilt})
  out["rebuilt:eval"] = commands.run("one:rebuilt-eval", "eval.py", workdir, {"data.data_dir": rebuilt})
  out["digests"] = (before, e2e.tree_digest(workdir))
  return out


# ---------------------------------------------------------------------------------------------------------------
# Reading the outputs.


def _masked_crc32c(data: bytes) -> int:
  from tensorboardX import crc32c  # pylint: disable=g-import-not-at-top
  crc = crc32c.crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _scalars(workdir: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value)]} from every TensorBoard event file (TFRecord framing, CRCs checked)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out: dict[str, list[tuple[int, float]]] = {}
  files = sorted((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert files, f"no TensorBoard event file in {workdir / 'tensorboard'}"
  for path in files:
    data, pos = path.read_bytes(), 0
    while pos < len(data):
      header = data[pos:pos + 8]
      (length,) = struct.unpack("<Q", header)
      assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == _masked_crc32c(header), f"{path}: bad length CRC"
      record = data[pos + 12:pos + 12 + length]
      assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == _masked_crc32c(record)
      pos += 16 + length
      event = event_pb2.Event.FromString(record)
      for v in event.summary.value:
        assert v.HasField("simple_value"), f"{path}: {v.tag} is not a scalar"
        out.setdefault(v.tag, []).append((int(event.step), float(v.simple_value)))
  return out


def _total_steps(run: e2e.Run) -> tuple[int, int]:
  """(total steps, steps per epoch) from the run's start-up log line."""
  m = re.search(r"(\d+) steps \((\d+) per epoch\)", run.stderr)
  assert m, f"{run.name}: no start-up line with the step count:\n{run.stderr[-2000:]}"
  return int(m.group(1)), int(m.group(2))


# ---------------------------------------------------------------------------------------------------------------
# The tests.


def test_sharded_run_on_8_devices_gives_the_same_scores_as_on_1(runs):
  one, eight = runs["one"].check(), runs["eight"].check()
  runs["one:eval"].check()
  runs["eight:eval"].check()
  assert re.search(r"1 devices \(cpu.*mesh data=1 x model=1", one.stderr)
  assert re.search(r"8 devices \(cpu.*mesh data=8 x model=1", eight.stderr), eight.stderr[-3000:]
  assert eight.json()["devices"] == 8 and one.json()["devices"] == 1
  a, b = e2e.predictions(one.workdir), e2e.predictions(eight.workdir)
  assert len(a) >= 16
  diff = e2e.max_relative_difference(b, a)
  assert diff <= 1e-3, f"8 devices vs 1: max relative score difference {diff:.2e}"
  ea = json.loads((one.workdir / "eval.json").read_text())
  eb = json.loads((eight.workdir / "eval.json").read_text())
  assert ea["checkpoint_step"] == eb["checkpoint_step"] and ea["num_images"] == eb["num_images"] == len(a)


def test_sigkilled_run_resumes_exactly(runs):
  one, killed, resumed = runs["one"].check(), runs["resumed:killed"], runs["resumed"].check()
  runs["resumed:eval"].check()
  total, _ = _total_steps(one)
  assert killed.info["killed"], "the run finished before a checkpoint could be seen"
  assert not killed.info["summary_before_kill"]
  assert killed.returncode == -signal.SIGKILL
  first = min(killed.info["committed_at_kill"])
  m = re.search(r"resumed from \S+/checkpoints/(\d+)", resumed.stderr)
  assert m, resumed.stderr[-3000:]
  assert first <= int(m.group(1)) < total
  diff = e2e.max_relative_difference(e2e.predictions(resumed.workdir), e2e.predictions(one.workdir))
  assert diff <= 1e-5, f"resumed vs uninterrupted: max relative score difference {diff:.2e}"
  sa = json.loads((one.workdir / "train_summary.json").read_text())
  sb = json.loads((resumed.workdir / "train_summary.json").read_text())
  assert sb["step"] == sa["step"] == total
  assert sb["checkpoints"] == sa["checkpoints"] and sb["best_step"] == sa["best_step"]
  assert abs(sb["test"]["srcc"] - sa["test"]["srcc"]) <= 1e-6


def test_checkpoints_along_the_run_keep_last_k_and_best(runs):
  one = runs["one"].check()
  total, _ = _total_steps(one)
  every, keep = e2e.SHORT["train.checkpoint_every"], e2e.SHORT["train.keep"]
  saved = sorted({s for s in range(every, total + 1, every)} | {total})
  assert len(saved) >= 3
  # Every save evaluates the validation split first and logs its SRCC.
  val = dict(_scalars(one.workdir)["val/srcc"])
  assert sorted(val) == saved
  best = max(val.values())
  best_steps = {s for s, v in val.items() if v == best}
  on_disk = sorted(int(p.name) for p in (one.workdir / "checkpoints").iterdir() if p.name.isdigit())
  summary = json.loads((one.workdir / "train_summary.json").read_text())
  assert summary["best_step"] in best_steps
  assert on_disk == sorted(set(saved[-keep:]) | {summary["best_step"]}) == summary["checkpoints"]
  # eval.py's default checkpoint is the best one.
  assert json.loads((one.workdir / "eval.json").read_text())["checkpoint_step"] == summary["best_step"]


def test_default_smoke_config_saves_at_least_three_checkpoints(runs):
  """Analytically, from configs/smoke.py as it is and the smoke data's training split."""
  from configs import smoke  # pylint: disable=g-import-not-at-top
  from mcpf_jax.train import data_setup  # pylint: disable=g-import-not-at-top
  config = smoke.get_config()
  with config.unlocked():
    config.data.data_dir = str(runs.commands.data_dir)
  data = data_setup.load(config, runs.commands.data_dir)
  per_epoch = len(data.indices["train"]) // config.train.batch_size
  total = config.optim.total_steps or config.train.num_epochs * per_epoch
  saves = len(set(range(config.train.checkpoint_every, total + 1, config.train.checkpoint_every)) | {total})
  assert saves >= 3, f"smoke: {total} steps, a checkpoint every {config.train.checkpoint_every}: {saves} saves"


@pytest.mark.filterwarnings("ignore:Sharding info not provided when restoring")  # read back on this process's CPU
def test_non_finite_loss_stops_naming_the_last_good_checkpoint(runs):
  run = runs["nonfinite"]
  assert run.returncode != 0, "a run with lr=1e30 finished"
  m = re.search(r"NonFiniteError: step (\d+): .*not finite; stopped without saving\. The last good checkpoint is "
                r"step (\d+) in (\S+) ", run.stderr)
  assert m, run.stderr[-3000:]
  bad, good, where = int(m.group(1)), int(m.group(2)), pathlib.Path(m.group(3))
  assert where == run.workdir / "checkpoints" and good < bad
  on_disk = sorted(int(p.name) for p in where.iterdir() if p.name.isdigit())
  assert on_disk and max(on_disk) == good
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  for step in on_disk:
    params = ocp.PyTreeCheckpointer().restore(where / str(step) / "params")  # the trainable parameters alone
    leaves = [np.asarray(x) for x in jax.tree.leaves(params)]
    assert leaves and all(np.isfinite(x).all() for x in leaves), f"checkpoint {step} has non-finite parameters"


def test_protocol_runner_reports_median_and_spread(runs):
  run = runs["protocol"].check()
  out = json.loads((run.workdir / "protocol.json").read_text())
  assert out["num_splits"] == 2 and len(out["per_split"]) == 2
  for s, result in enumerate(out["per_split"]):
    summary = json.loads((run.workdir / f"split_{s}" / "train_summary.json").read_text())
    assert result["srcc"] == summary["test"]["srcc"] and result["num_images"] == summary["test"]["num_images"]
  for key in ("srcc", "plcc", "plcc_logistic", "krcc", "rmse"):
    values = [r[key] for r in out["per_split"]]
    got = out["summary"][key]
    assert got["values"] == values
    assert got["median"] == pytest.approx(np.median(values)) and got["std"] == pytest.approx(np.std(values))
    assert got["min"] <= got["q25"] <= got["median"] <= got["q75"] <= got["max"]
  # The two splits hold out different photos: their continuous metrics differ (SRCC alone can coincide: two test
  # sets of 32 images whose predictions rank alike give the same rank correlation, as seen in CI).
  first, second = ({k: r[k] for k in ("plcc", "rmse")} for r in out["per_split"])
  assert first["plcc"] != second["plcc"] and first["rmse"] != second["rmse"], (first, second)
  assert run.json()["num_splits"] == 2 and run.json()["srcc_median"] == out["summary"]["srcc"]["median"]


def test_logging_progress_bar_tensorboard_and_quiet_orbax(runs):
  one, resumed_eval = runs["one"].check(), runs["resumed:eval"].check()
  total, _ = _total_steps(one)
  # The progress bar (tqdm on stderr) with loss and speed, and the one-line summary.
  assert re.search(rf"train: 100%.*{total}/{total}.*img_s=[\d.]+, loss=[\d.]+", one.stderr)
  assert re.search(r"done: smoke step \d+ \| test SRCC -?[\d.]+ PLCC -?[\d.]+ \(\d+ images\)", one.stderr)
  # TensorBoard: train/loss every log_every steps, finite.
  scalars = _scalars(one.workdir)
  every = e2e.SHORT["train.log_every"]
  loss = dict(scalars["train/loss"])
  assert sorted(loss) == sorted(set(range(every, total + 1, every)) | {total})
  assert all(math.isfinite(v) and v > 0 for v in loss.values())
  for tag in ("train/lr", "train/grad_norm", "train/images_per_second", "val/srcc", "test/srcc"):
    assert tag in scalars, sorted(scalars)
  # orbax's INFO lines are hidden by default, and shown with an explicit --verbosity.
  assert not ORBAX_INFO.search(one.stderr), ORBAX_INFO.search(one.stderr).group(0)
  assert not ORBAX_INFO.search(runs["one:eval"].stderr)
  assert ORBAX_INFO.search(resumed_eval.stderr)


# ---------------------------------------------------------------------------------------------------------------
# A run's identity: config, dataset and split, checked on every restart and evaluation.


def test_restart_with_a_changed_config_is_refused_and_changes_nothing(runs):
  runs["one"].check()
  out = runs["one:refused"]
  for name, _, field, saved, new in REFUSED:
    run = out[name]
    assert run.returncode != 0, f"a restart with {field} changed was not refused"
    assert f"{field}: saved {saved}, now {new}" in run.stderr, run.stderr[-2000:]
    assert "Nothing was changed" in run.stderr and "init_from" in run.stderr
    assert "Traceback" not in run.stderr and "train: " not in run.stderr  # no traceback, no step
  before, after = out["digests"]
  assert before == after, "a refused restart changed files: " + str(sorted(set(before.items()) ^ set(after.items())))
  assert any(k.startswith("checkpoints/") for k in before)


def test_a_rebuilt_dataset_is_refused_at_resume_and_at_eval(runs):
  out = runs["one:refused"]
  for key in ("rebuilt:train", "rebuilt:eval"):
    run = out[key]
    assert run.returncode != 0, f"{key}: a rebuilt dataset was accepted"
    assert "is not the one this run started on" in run.stderr and "fingerprint: saved" in run.stderr, \
        run.stderr[-2000:]
    assert "Traceback" not in run.stderr


def test_an_allowed_change_resumes(runs):
  resumed = runs["resumed"].check()
  assert "restart with train.log_every changed: 3 -> 1" in resumed.stderr, resumed.stderr[-3000:]


def test_the_run_records_its_config_dataset_and_split(runs):
  one = runs["one"].check()
  record = json.loads((one.workdir / "run.json").read_text())
  split = json.loads((one.workdir / "split.json").read_text())
  assert record["config"]["train"]["batch_size"] == 16 and record["config"]["data"]["split_seed"] == 0
  assert record["dataset"]["name"] == "smoke" and len(record["dataset"]["fingerprint"]) == 64
  assert split["protocol"] == "seed" and split["split_seed"] == 0
  names = {side: set(split[side]) for side in ("train", "val", "test")}
  assert not (names["train"] & names["test"]) and not (names["val"] & names["test"])
  assert record["split"]["num_test"] == len(split["test"]) == one.json()["num_images"]
  assert set(e2e.predictions(one.workdir)) == names["test"]  # one:eval scored exactly the test images


def test_eval_of_a_protocol_split_uses_that_splits_own_test_images(runs):
  protocol = runs["protocol"].check()
  split_1 = protocol.workdir / "split_1"
  summary = json.loads((split_1 / "train_summary.json").read_text())
  test_names = json.loads((split_1 / "split.json").read_text())["test"]
  out = json.loads((protocol.workdir / "protocol.json").read_text())
  assert out["runs"][1]["split_seed"] == 1 and out["runs"][1]["split_file"] == "split_1/split.json"
  # Split 1's test photos are not split 0's: a config-file seed would have evaluated other images.
  assert set(test_names) != set(json.loads((protocol.workdir / "split_0" / "split.json").read_text())["test"])
  with_config = runs["split_1:eval"].check()
  without = runs["split_1:eval-noconfig"].check()
  for run in (with_config, without):
    got = run.json()
    assert got["num_images"] == len(test_names) == summary["test"]["num_images"]
    assert got["srcc"] == summary["test"]["srcc"] and got["plcc"] == summary["test"]["plcc"], (got, summary)
  assert "not used from --config: data.split_seed=0 (the run has 1)" in with_config.stderr
  assert set(e2e.predictions(split_1)) == set(test_names)


@pytest.mark.filterwarnings("ignore:Sharding info not provided when restoring")  # read back on this process's CPU
def test_init_from_starts_from_the_other_runs_trainable_weights(runs):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  one, init = runs["one"].check(), runs["init"].check()
  record = json.loads((init.workdir / "run.json").read_text())
  src_step = max(int(p.name) for p in (one.workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert record["init_from"]["step"] == src_step and "step 0 starts from the trainable weights" in init.stderr
  read = lambda d: ocp.PyTreeCheckpointer().restore(d / "params")
  theirs = read(one.workdir / "checkpoints" / str(src_step))
  ours = read(init.workdir / "checkpoints" / "3")
  flat_a, flat_b = jax.tree_util.tree_flatten_with_path(theirs)[0], jax.tree_util.tree_flatten_with_path(ours)[0]
  assert [k for k, _ in flat_a] == [k for k, _ in flat_b] and flat_a
  for (k, a), (_, b) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(k))
