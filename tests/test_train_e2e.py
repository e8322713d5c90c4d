"""End to end: train.py and eval.py on the smoke config, run as subprocesses the way people run them.

Checks issue 5's acceptance: the same held-out scores on 8 simulated devices as on 1 (relative difference
<= 1e-3), exact resume after SIGKILL (<= 1e-5), checkpoints along the run (last K + the best by validation SRCC),
the non-finite guard, the 10-split protocol runner (here 2 splits), TensorBoard scalars, the progress bar and a
log without orbax's INFO chatter.

Cost: every run is the smoke run cut to one epoch (9 steps of 16 images, a checkpoint every 3 steps). The runs
go in two lanes of subprocesses started once per module (module fixture `runs`): lane 1 runs the 1-device run,
its evaluation, the killed and resumed run and the protocol; lane 2 the 8-device run and the non-finite run.
They share one smoke dataset (built once, in this process) and one JAX persistent compilation cache, so identical
programs (the 1-device train and eval steps of the plain, resumed and protocol runs) are compiled once. Measured
on 2 shared cores (load ~5): ~215 s wall, ~235 s CPU in all; the 1-device run ~48 s CPU (half of it compiling
the train step), the 8-device run ~62 s, the non-finite run ~30 s (lr is a compile-time constant). The module's
teardown prints each run's wall and CPU time (`pytest -s`).
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import json
import math
import os
import pathlib
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import Callable

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "smoke.py")
TIMEOUT_S = 600
# One epoch of the smoke run, a checkpoint every 3 steps; the batch sizes divide over 8 devices.
SHORT = {
    "train.num_epochs": 1, "train.batch_size": 16, "eval.batch_size": 16, "train.checkpoint_every": 3,
    "train.keep": 2, "train.log_every": 3, "optim.warmup_steps": 2,
}
# orbax modules that log INFO lines at every save / restore (absl's log prefix names the file).
# No line anchor: tqdm's carriage-return updates put a progress bar in front of some log lines.
ORBAX_INFO = re.compile(r"I\d{4} [\d:.]+ +\d+ (checkpoint_manager|async_checkpointer|composite_checkpoint_handler)"
                        r"\.py:\d+\]")


# ---------------------------------------------------------------------------------------------------------------
# Running the commands.


@dataclasses.dataclass
class Run:
  """One finished command: its workdir, exit status, outputs and wall time."""
  name: str
  workdir: pathlib.Path
  returncode: int
  stdout: str
  stderr: str
  seconds: float
  info: dict = dataclasses.field(default_factory=dict)

  def check(self) -> "Run":
    assert self.returncode == 0, f"{self.name} exited with {self.returncode}:\n{self.stderr[-4000:]}"
    return self

  def json(self) -> dict:
    return json.loads(self.stdout.strip().splitlines()[-1])


class Commands:
  """Builds and runs train.py / eval.py command lines against a shared dataset and compilation cache."""

  def __init__(self, root: pathlib.Path, data_dir: pathlib.Path):
    self.root = root
    self.data_dir = data_dir
    self.cache = root / "jax_cache"
    self.timings: dict[str, tuple[float, float]] = {}  # name: (wall seconds, CPU seconds)

  def env(self, devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(self.cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    if devices > 1:
      env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env

  def argv(self, script: str, workdir: pathlib.Path, overrides: dict, extra: tuple[str, ...] = ()) -> list[str]:
    cfg = {**SHORT, "data.data_dir": str(self.data_dir), **overrides}
    return ([sys.executable, script, "--config", SMOKE, "--workdir", str(workdir)]
            + [f"--config.{k}={v}" for k, v in cfg.items()] + list(extra))

  def run(self, name: str, script: str, workdir: pathlib.Path, overrides: dict | None = None, *, devices: int = 1,
          extra: tuple[str, ...] = (), kill_after_checkpoint: bool = False) -> Run:
    """Runs `script` to the end, or with kill_after_checkpoint, SIGKILLs it once a checkpoint is committed."""
    argv = self.argv(script, workdir, overrides or {}, extra)
    out, err = self.root / f"{name}.stdout", self.root / f"{name}.stderr"
    start = time.perf_counter()
    info = {}
    with open(out, "w") as fo, open(err, "w") as fe:
      proc = subprocess.Popen(argv, cwd=REPO, env=self.env(devices), stdout=fo, stderr=fe)
      if kill_after_checkpoint:
        info.update(_kill_after_first_checkpoint(proc, workdir / "checkpoints", start))
      returncode, cpu = _wait(proc, start + TIMEOUT_S)
    seconds = time.perf_counter() - start
    self.timings[name] = (seconds, cpu)
    return Run(name, workdir, returncode, out.read_text(), err.read_text(), seconds, info)


def _wait(proc: subprocess.Popen, deadline: float) -> tuple[int, float]:
  """(exit status, CPU seconds used) of `proc`, killed at `deadline` (time.perf_counter())."""
  while True:
    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    if pid:
      proc.returncode = os.waitstatus_to_exitcode(status)
      return proc.returncode, usage.ru_utime + usage.ru_stime
    if time.perf_counter() > deadline:
      proc.kill()
    time.sleep(0.05)


def _kill_after_first_checkpoint(proc: subprocess.Popen, checkpoints: pathlib.Path, start: float) -> dict:
  """SIGKILLs `proc` as soon as a committed checkpoint exists.

  orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>` when it is complete, so a
  directory named by digits alone is a committed checkpoint.
  """
  while time.perf_counter() - start < TIMEOUT_S:
    # WNOWAIT: look without reaping, so that _wait still collects the exit status and CPU time.
    if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
      return {"killed": False}
    steps = [p.name for p in checkpoints.iterdir() if p.name.isdigit()] if checkpoints.is_dir() else []
    if steps:
      finished_before = (checkpoints.parent / "train_summary.json").exists()
      os.kill(proc.pid, signal.SIGKILL)
      return {"killed": True, "committed_at_kill": sorted(int(s) for s in steps),
              "summary_before_kill": finished_before}
    time.sleep(0.02)
  return {"killed": False}


class Lane:
  """Runs named jobs one after another in a background thread; `futures[name]` holds each job's result."""

  def __init__(self, jobs: list[tuple[str, Callable[[], Run]]]):
    self.futures = {name: concurrent.futures.Future() for name, _ in jobs}
    self.thread = threading.Thread(target=self._work, args=(jobs,), daemon=True)
    self.thread.start()

  def _work(self, jobs):
    for name, job in jobs:
      try:
        self.futures[name].set_result(job())
      except BaseException as e:  # pylint: disable=broad-except
        self.futures[name].set_exception(e)


class Runs:
  """`runs[name]` waits for the run `name` of any lane and returns it (or raises what it raised)."""

  def __init__(self, commands: Commands, lanes: list[Lane]):
    self.commands = commands
    self.futures = {k: f for lane in lanes for k, f in lane.futures.items()}

  def __getitem__(self, name: str) -> Run:
    return self.futures[name].result(timeout=3 * TIMEOUT_S)


def _build_smoke_data(data_dir: pathlib.Path) -> None:
  """Builds the smoke dataset once, with the project's own code, for every run to share."""
  from configs import smoke  # pylint: disable=g-import-not-at-top
  from mcpf_jax.train import data_setup  # pylint: disable=g-import-not-at-top
  config = smoke.get_config()
  with config.unlocked():
    config.data.data_dir = str(data_dir)
  data_setup.open_source(config, data_setup.SMOKE, data_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
  root = tmp_path_factory.mktemp("e2e")
  start = time.perf_counter()
  _build_smoke_data(root / "data")
  commands = Commands(root, root / "data")
  commands.timings["build smoke data"] = (time.perf_counter() - start, math.nan)

  def train(name, **kw):
    return lambda: commands.run(name, "train.py", root / name.split(":")[0], **kw)

  def evaluate(name, **kw):
    return lambda: commands.run(name, "eval.py", root / name.split(":")[0], **kw)

  lane1 = Lane([
      ("one", train("one")),
      ("one:eval", evaluate("one:eval")),
      ("resumed:killed", train("resumed:killed", kill_after_checkpoint=True)),
      ("resumed", train("resumed")),
      ("resumed:eval", evaluate("resumed:eval", extra=("--verbosity=0",))),
      ("protocol", train("protocol", overrides={"splits": 2, "train.checkpoint_every": 9})),
  ])
  lane2 = Lane([
      ("eight", train("eight", overrides={"mesh.data": 8}, devices=8)),
      ("eight:eval", evaluate("eight:eval", overrides={"mesh.data": 8}, devices=8)),
      ("nonfinite", train("nonfinite", overrides={"optim.lr": 1e30, "train.checkpoint_every": 1})),
  ])
  yield Runs(commands, [lane1, lane2])
  for lane in (lane1, lane2):
    lane.thread.join(timeout=3 * TIMEOUT_S)
  total = time.perf_counter() - start
  lines = [f"  {k:<20s} {wall:6.1f} s wall {cpu:6.1f} s CPU" for k, (wall, cpu) in commands.timings.items()]
  lines.append(f"  total {total:.1f} s wall")
  sys.stderr.write("\nend-to-end runs (two lanes in parallel):\n" + "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Reading the outputs.


def _predictions(workdir: pathlib.Path) -> dict[str, tuple[float, float]]:
  with open(workdir / "eval_predictions.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert rows and list(rows[0]) == ["name", "mos", "score"]
  return {r["name"]: (float(r["mos"]), float(r["score"])) for r in rows}


def _max_relative_difference(a: dict, b: dict) -> float:
  assert sorted(a) == sorted(b), "the two runs scored different images"
  return max(abs(a[k][1] - b[k][1]) / abs(b[k][1]) for k in a)


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


def _total_steps(run: Run) -> tuple[int, int]:
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
  a, b = _predictions(one.workdir), _predictions(eight.workdir)
  assert len(a) >= 16
  diff = _max_relative_difference(b, a)
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
  diff = _max_relative_difference(_predictions(resumed.workdir), _predictions(one.workdir))
  assert diff <= 1e-5, f"resumed vs uninterrupted: max relative score difference {diff:.2e}"
  sa = json.loads((one.workdir / "train_summary.json").read_text())
  sb = json.loads((resumed.workdir / "train_summary.json").read_text())
  assert sb["step"] == sa["step"] == total
  assert sb["checkpoints"] == sa["checkpoints"] and sb["best_step"] == sa["best_step"]
  assert abs(sb["test"]["srcc"] - sa["test"]["srcc"]) <= 1e-6


def test_checkpoints_along_the_run_keep_last_k_and_best(runs):
  one = runs["one"].check()
  total, _ = _total_steps(one)
  every, keep = SHORT["train.checkpoint_every"], SHORT["train.keep"]
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
  splits = data_setup.load(config, runs.commands.data_dir)
  per_epoch = len(splits.indices["train"]) // config.train.batch_size
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
    state = ocp.PyTreeCheckpointer().restore(where / str(step) / "state")
    leaves = [np.asarray(x) for x in jax.tree.leaves(state["params"])]
    assert leaves and all(np.isfinite(x).all() for x in leaves), f"checkpoint {step} has non-finite parameters"


def test_protocol_runner_reports_median_and_spread(runs):
  run = runs["protocol"].check()
  out = json.loads((run.workdir / "protocol.json").read_text())
  assert out["splits"] == 2 and len(out["per_split"]) == 2
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
  assert run.json()["splits"] == 2 and run.json()["srcc_median"] == out["summary"]["srcc"]["median"]


def test_logging_progress_bar_tensorboard_and_quiet_orbax(runs):
  one, resumed_eval = runs["one"].check(), runs["resumed:eval"].check()
  total, _ = _total_steps(one)
  # The progress bar (tqdm on stderr) with loss and speed, and the one-line summary.
  assert re.search(rf"train: 100%.*{total}/{total}.*img_s=[\d.]+, loss=[\d.]+", one.stderr)
  assert re.search(r"done: smoke step \d+ \| test SRCC -?[\d.]+ PLCC -?[\d.]+ \(\d+ images\)", one.stderr)
  # TensorBoard: train/loss every log_every steps, finite.
  scalars = _scalars(one.workdir)
  every = SHORT["train.log_every"]
  loss = dict(scalars["train/loss"])
  assert sorted(loss) == sorted(set(range(every, total + 1, every)) | {total})
  assert all(math.isfinite(v) and v > 0 for v in loss.values())
  for tag in ("train/lr", "train/grad_norm", "train/images_per_second", "val/srcc", "test/srcc"):
    assert tag in scalars, sorted(scalars)
  # orbax's INFO lines are hidden by default, and shown with an explicit --verbosity.
  assert not ORBAX_INFO.search(one.stderr), ORBAX_INFO.search(one.stderr).group(0)
  assert not ORBAX_INFO.search(runs["one:eval"].stderr)
  assert ORBAX_INFO.search(resumed_eval.stderr)
