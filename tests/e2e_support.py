"""Running train.py / eval.py as subprocesses the way people run them, for the end-to-end tests.

`Commands` builds the command lines (the smoke config cut short, a shared dataset and XLA compilation cache);
`Lane`s run jobs one after another in background threads and `Runs` waits for any of them by name. `SharedRuns`:
the smoke dataset and the plain 1-device run that several modules need alike, made once per pytest session.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "smoke.py")
TIMEOUT_S = 600
# The tests' CPU programs are compiled at LLVM's lowest optimisation level: XLA's own (HLO) passes are unchanged, so
# the program computes the same thing (numbers within float rounding); its machine code is slower, but the tests'
# models are tiny and their compiles dominate (about 30% less time on test_model's train steps). Set by conftest for
# the pytest processes and by `Commands.env` for the commands they start.
CPU_XLA_FLAGS = "--xla_backend_optimization_level=0"
# One epoch of the smoke run, a checkpoint every 3 steps; the batch sizes divide over 8 devices.
SHORT = {
    "train.num_epochs": 1, "train.batch_size": 16, "eval.batch_size": 16, "train.checkpoint_every": 3,
    "train.keep": 2, "train.log_every": 3, "optim.warmup_steps": 2,
}
# conftest's `smoke_run`: the smoke config cut to one epoch (4 steps of 32 images), a checkpoint every 2 steps.
SMOKE_RUN = {"train.num_epochs": 1, "train.checkpoint_every": 2}


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

  def check(self) -> Run:
    assert self.returncode == 0, f"{self.name} exited with {self.returncode}:\n{self.stderr[-4000:]}"
    return self

  def json(self) -> dict:
    return json.loads(self.stdout.strip().splitlines()[-1])


class Commands:
  """Builds and runs train.py / eval.py command lines against a shared dataset and compilation cache.

  The cache is the session's (conftest's JAX_COMPILATION_CACHE_DIR, which every module's commands and the xdist
  workers share: the same 1-device programs are compiled once per session, not once per module), or
  `root`/jax_cache outside pytest.
  """

  def __init__(self, root: pathlib.Path, data_dir: pathlib.Path):
    self.root = root
    self.data_dir = data_dir
    self.cache = pathlib.Path(os.environ.get("JAX_COMPILATION_CACHE_DIR") or root / "jax_cache")
    self.timings: dict[str, tuple[float, float]] = {}  # name: (wall seconds, CPU seconds)

  def env(self, devices: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(self.cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5", PYTHONUNBUFFERED="1")
    env["XLA_FLAGS"] = CPU_XLA_FLAGS + (f" --xla_force_host_platform_device_count={devices}" if devices > 1 else "")
    env.update(extra or {})
    return env

  def argv(self, script: str, workdir: pathlib.Path, overrides: dict | None, extra: tuple[str, ...] = ()
           ) -> list[str]:
    """The command line; `overrides` None: no --config at all (eval.py takes everything from the run)."""
    if overrides is None:
      return [sys.executable, script, "--workdir", str(workdir)] + list(extra)
    cfg = {**SHORT, "data.data_dir": str(self.data_dir), **overrides}
    return ([sys.executable, script, "--config", SMOKE, "--workdir", str(workdir)]
            + [f"--config.{k}={v}" for k, v in cfg.items()] + list(extra))

  def run(self, name: str, script: str, workdir: pathlib.Path, overrides: dict | None = None, *, devices: int = 1,
          extra: tuple[str, ...] = (), kill_after_checkpoint: bool = False, config_file: bool = True,
          signal_after_checkpoint: int | None = None, signal_after_step: int | None = None,
          env: dict[str, str] | None = None) -> Run:
    """Runs `script` to the end, or with kill_after_checkpoint, SIGKILLs it once a checkpoint is committed.

    config_file=False: no --config (and no overrides) on the command line. signal_after_checkpoint: a signal to
    send once a checkpoint is committed (kill_after_checkpoint: SIGKILL). env: variables added to the environment.
    """
    argv = self.argv(script, workdir, (overrides or {}) if config_file else None, extra)
    out, err = self.root / f"{name}.stdout", self.root / f"{name}.stderr"
    start = time.perf_counter()
    info = {}
    with open(out, "w") as fo, open(err, "w") as fe:
      proc = subprocess.Popen(argv, cwd=REPO, env=self.env(devices, env), stdout=fo, stderr=fe)
      if kill_after_checkpoint:
        signal_after_checkpoint = signal.SIGKILL
      if signal_after_checkpoint is not None:
        info.update(signal_after_first_checkpoint([proc], workdir / "checkpoints", start, signal_after_checkpoint))
      elif signal_after_step is not None:
        info.update(signal_when([proc], trained_a_step(err), workdir / "checkpoints", start, signal_after_step))
      returncode, cpu = wait(proc, start + TIMEOUT_S)
      if "signalled_at" in info:
        info["exited_after_signal_s"] = time.perf_counter() - info["signalled_at"]
    seconds = time.perf_counter() - start
    self.timings[name] = (seconds, cpu)
    return Run(name, workdir, returncode, out.read_text(), err.read_text(), seconds, info)

  def run_processes(self, name: str, script: str, workdir: pathlib.Path, overrides: dict | None = None, *,
                    processes: int = 2, devices: int = 2, extra: tuple[str, ...] = (),
                    signal_after_checkpoint: int | None = None, signal_after_step: int | None = None,
                    targets: tuple[int, ...] | None = None, launch_flags: bool = True,
                    env: Callable[[int], dict[str, str]] | None = None,
                    after_step: Callable[[], None] | None = None) -> list[Run]:
    """Runs `script` as `processes` jax processes on localhost (gloo collectives), `devices` CPU devices each,
    with the explicit launch flags (launch_flags=False: none; the environment `env(i)` adds to process i's must
    then say what the job is); optionally sends `signal_after_checkpoint` to procs `targets` once a checkpoint is
    committed, or `signal_after_step` once process 0 finished a training step, or calls `after_step()` then.
    Returns one Run per process (info["exited_at"]: seconds after the signal)."""
    port = free_port()
    start = time.perf_counter()
    procs, files = [], []
    for i in range(processes):
      launch = (f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}", f"--process_id={i}")
      argv = self.argv(script, workdir, overrides or {}, extra + (launch if launch_flags else ()))
      fo, fe = open(self.root / f"{name}.{i}.stdout", "w"), open(self.root / f"{name}.{i}.stderr", "w")
      files.append((fo, fe))
      procs.append(subprocess.Popen(argv, cwd=REPO, env=self.env(devices, env(i) if env else None), stdout=fo,
                                    stderr=fe))
    info = {}
    if signal_after_checkpoint is not None:
      info = signal_after_first_checkpoint(procs, workdir / "checkpoints", start, signal_after_checkpoint, targets)
    elif signal_after_step is not None or after_step is not None:
      info = signal_when(procs, trained_a_step(self.root / f"{name}.0.stderr"), workdir / "checkpoints", start,
                         signal_after_step, targets, action=after_step)
    runs = []
    for i, proc in enumerate(procs):
      returncode, cpu = wait(proc, start + TIMEOUT_S)
      ended = time.perf_counter()
      fo, fe = files[i]
      fo.close()
      fe.close()
      self.timings[f"{name}.{i}"] = (ended - start, cpu)
      proc_info = dict(info)
      if "signalled_at" in info:
        proc_info["exited_after_signal_s"] = ended - info["signalled_at"]
      runs.append(Run(f"{name}.{i}", workdir, returncode, (self.root / f"{name}.{i}.stdout").read_text(),
                      (self.root / f"{name}.{i}.stderr").read_text(), ended - start, proc_info))
    return runs


def wait(proc: subprocess.Popen, deadline: float) -> tuple[int, float]:
  """(exit status, CPU seconds used) of `proc`, killed at `deadline` (time.perf_counter())."""
  while True:
    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    if pid:
      proc.returncode = os.waitstatus_to_exitcode(status)
      return proc.returncode, usage.ru_utime + usage.ru_stime
    if time.perf_counter() > deadline:
      proc.kill()
    time.sleep(0.05)


def committed_checkpoint(checkpoints: pathlib.Path) -> Callable[[], bool]:
  """A condition: a committed checkpoint exists. orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and
  renames it to `<step>` when it is complete, so a directory named by digits alone is a committed checkpoint."""
  return lambda: checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())


# tqdm's progress bar (process 0's stderr) once at least one step is done: "train:  11%|...| 1/9 [".
_STEPPED = re.compile(r"\| *[1-9]\d*/\d+ \[")


def trained_a_step(stderr: pathlib.Path) -> Callable[[], bool]:
  """A condition: the progress bar in `stderr` shows at least one finished step (training is under way)."""
  return lambda: stderr.exists() and bool(_STEPPED.search(stderr.read_text(errors="replace")))


def signal_when(procs: list[subprocess.Popen], ready: Callable[[], bool], checkpoints: pathlib.Path,
                start: float, sig: int | None = signal.SIGKILL, targets: tuple[int, ...] | None = None,
                action: Callable[[], None] | None = None) -> dict:
  """Sends `sig` to procs[i] for i in `targets` (default all) as soon as `ready()` (or calls `action()` instead).

  info: killed (whether the signal was sent before any process ended), committed_at_kill (the committed
  checkpoint steps then), summary_before_kill, signalled_at (time.perf_counter()).
  """
  targets = tuple(range(len(procs))) if targets is None else targets
  while time.perf_counter() - start < TIMEOUT_S:
    # WNOWAIT: look without reaping, so that wait() still collects the exit status and CPU time.
    if any(os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None for p in procs):
      return {"killed": False}
    if ready():
      steps = [p.name for p in checkpoints.iterdir() if p.name.isdigit()] if checkpoints.is_dir() else []
      finished_before = (checkpoints.parent / "train_summary.json").exists()
      if action is not None:
        action()
      else:
        for i in targets:
          os.kill(procs[i].pid, sig)
      return {"killed": True, "committed_at_kill": sorted(int(s) for s in steps),
              "summary_before_kill": finished_before, "signalled_at": time.perf_counter()}
    time.sleep(0.02)
  return {"killed": False}


def signal_after_first_checkpoint(procs: list[subprocess.Popen], checkpoints: pathlib.Path, start: float,
                                  sig: int = signal.SIGKILL, targets: tuple[int, ...] | None = None) -> dict:
  return signal_when(procs, committed_checkpoint(checkpoints), checkpoints, start, sig, targets)


def kill_after_first_checkpoint(proc: subprocess.Popen, checkpoints: pathlib.Path, start: float) -> dict:
  """SIGKILLs `proc` as soon as a committed checkpoint exists."""
  return signal_after_first_checkpoint([proc], checkpoints, start)


def free_port() -> int:
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


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


def session_root(tmp_path_factory) -> pathlib.Path:
  """The folder every pytest-xdist worker of this session shares (the parent of a worker's basetemp; without
  xdist, the basetemp itself)."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def once(key: pathlib.Path, make: Callable[[], None]) -> None:
  """Calls `make()` unless `key`.done exists, under the file lock `key`.lock: the first caller of the session (any
  xdist worker, any thread) makes the thing while the others wait, and nobody makes it twice. A `make` that raised
  leaves no .done: the next caller makes it again (`make` must clear what a failed try left)."""
  done = key.parent / f"{key.name}.done"
  with open(key.parent / f"{key.name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # per open file: excludes this process's other threads too; released on close
    if not done.exists():
      make()
      done.touch()


class SharedRuns:
  """What test_train_e2e, test_multiprocess and test_cluster need alike, made once per pytest session (by the
  first xdist worker that asks, the others waiting) under `root`: the smoke dataset, and "one" (train.py on 1
  device, the SHORT config) with "one:eval" (eval.py of it), the uninterrupted run the other runs are compared to.

  The run folder is shared: read it, never write to it (copy it to restart or change it).
  """

  def __init__(self, root: pathlib.Path):
    self.root = root
    self.commands = Commands(root, root / "data")
    self.one_dir = root / "one"

  def data(self) -> pathlib.Path:
    """The smoke dataset's data_dir, built on first use."""
    data_dir = self.commands.data_dir

    def make():
      shutil.rmtree(data_dir, ignore_errors=True)
      build_smoke_data(data_dir)

    once(data_dir, make)
    return data_dir

  def _run(self, name: str, script: str, clear: bool) -> Run:
    saved = self.root / f"{name}.run.json"

    def make():
      if clear:
        shutil.rmtree(self.one_dir, ignore_errors=True)
      run = self.commands.run(name, script, self.one_dir)
      saved.write_text(json.dumps({**dataclasses.asdict(run), "workdir": str(run.workdir)}))

    once(saved, make)
    fields = json.loads(saved.read_text())
    return Run(**{**fields, "workdir": pathlib.Path(fields["workdir"])})

  def one(self) -> Run:
    """train.py on 1 device, the SHORT config: a finished run (check() it)."""
    self.data()
    return self._run("one", "train.py", clear=True)

  def one_eval(self) -> Run:
    """eval.py of `one` (its default, best checkpoint), which writes eval.json and eval_predictions.csv there."""
    self.one()
    return self._run("one:eval", "eval.py", clear=False)


def build_smoke_data(data_dir: pathlib.Path) -> None:
  """Builds the smoke dataset once, with the project's own code, for every run to share."""
  from configs import smoke  # pylint: disable=g-import-not-at-top
  from mcpf_jax.train import data_setup  # pylint: disable=g-import-not-at-top
  config = smoke.get_config()
  with config.unlocked():
    config.data.data_dir = str(data_dir)
  data_setup.open_source(config, config.data.name, data_dir)


# ---------------------------------------------------------------------------------------------------------------
# Reading the outputs.


def predictions(workdir: pathlib.Path, file: str = "eval_predictions.csv") -> dict[str, tuple[float, float]]:
  """{name: (mos, score)} of eval.py's predictions (or train.py's final test_predictions.csv)."""
  with open(workdir / file, newline="") as f:
    rows = list(csv.DictReader(f))
  assert rows and list(rows[0]) == ["name", "mos", "score"]
  return {r["name"]: (float(r["mos"]), float(r["score"])) for r in rows}


def max_relative_difference(a: dict, b: dict) -> float:
  assert sorted(a) == sorted(b), "the two runs scored different images"
  return max(abs(a[k][1] - b[k][1]) / abs(b[k][1]) for k in a)


def tree_digest(root: pathlib.Path) -> dict[str, str]:
  """{relative path: sha256} of every file under `root`: proof that a refused start changed nothing."""
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def report_timings(commands: Commands, start: float, title: str) -> None:
  """Writes each run's wall and CPU time and the total to stderr (`pytest -s` shows it)."""
  lines = [f"  {k:<20s} {wall:6.1f} s wall {cpu:6.1f} s CPU" for k, (wall, cpu) in commands.timings.items()]
  lines.append(f"  total {time.perf_counter() - start:.1f} s wall")
  sys.stderr.write(f"\n{title}:\n" + "\n".join(lines) + "\n")
