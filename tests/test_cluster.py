"""Launching on a cluster with no launch flags: jax's own detection of a SLURM job, and the refusal of a start that
would train alone.

- A real one-node SLURM (tests/slurm_local.py starts munged, slurmctld and slurmd on localhost, or reuses them):
  `srun -n 2 python train.py --config configs/smoke.py ...` with no launch flag trains as one 2-process job (each
  task logs the environment jax detected and "process I of 2 processes"). A machine without SLURM fails these
  tests with the install command; they are never skipped.
- The SLURM variables of a 2-task job step, set by hand on 2 local processes with no launch flag: jax forms one
  2-process job too (eval.py on the srun run: the same detection as train.py, at a third of the cost).
- A start that would train alone is refused before anything is written (exit 2, the message names the variable and
  the fix): train.py as an sbatch script runs it (SLURM_NTASKS=2, no job step: one task started), eval.py with
  --nodistributed in a 2-task step.
Every run is the smoke run cut to 3 steps of 48 images and one crop per evaluated image.
"""

from __future__ import annotations

import json
import random
import re
import socket
import subprocess

import e2e_support as e2e
import pytest
import slurm_local

pytestmark = pytest.mark.slow

QUICK = {"train.batch_size": 48, "eval.num_crops": 1, "train.checkpoint_every": 100}
DETECTED = "cluster environment: SLURM job step (SLURM_NTASKS=2), detected by jax (SlurmCluster): 2 processes"


@pytest.fixture(scope="module")
def commands(tmp_path_factory, e2e_shared) -> e2e.Commands:
  return e2e.Commands(tmp_path_factory.mktemp("cluster"), e2e_shared.data())


def _job_id() -> int:
  """A SLURM_JOB_ID whose coordinator port (jax: 61440 + job id % 4096) is free on this machine."""
  for port in random.sample(range(61440, 65536), 100):
    with socket.socket() as s:
      try:
        s.bind(("", port))
      except OSError:
        continue
    return 4096 * 3 + port - 61440
  raise AssertionError("no free port in 61440..65535")


def _step(job: int, task: int, host: str = "localhost") -> dict[str, str]:
  """What srun sets in task `task` of a 2-task step (the variables jax's SlurmCluster reads among them)."""
  return {"SLURM_JOB_ID": str(job), "SLURM_NTASKS": "2", "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task),
          "SLURM_JOB_NODELIST": host, "SLURM_STEP_NODELIST": host, "SLURM_STEP_NUM_TASKS": "2",
          "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_ID": "0"}


def _one_job(runs: list[e2e.Run], script: str) -> None:
  for i, r in enumerate(runs):
    r.check()
    assert DETECTED in r.stderr, r.stderr[-3000:]
    if script == "train.py":
      assert re.search(rf"process {i} of 2 processes: 2 local / 4 global devices", r.stderr), r.stderr[-3000:]
    else:  # eval.py: each process decodes its data shard (one of 2)
      assert re.search(rf"this process \({i} of 2, data shard {i} of 2\)", r.stderr), r.stderr[-3000:]


@pytest.fixture(scope="module")
def slurm():
  cluster = slurm_local.Cluster().start()  # SlurmUnavailable (not a skip) where SLURM is missing
  yield cluster
  cluster.stop()


@pytest.fixture(scope="module")
def srun_run(commands, slurm) -> list[e2e.Run]:
  """`srun -n 2 python train.py ...` with no launch flag, each task's output in its own files."""
  del slurm
  workdir = commands.root / "srun"
  out = commands.root / "srun.%t"
  argv = (["srun", "--ntasks=2", f"--chdir={e2e.REPO}", f"--output={out}.stdout", f"--error={out}.stderr",
           "--time=10", "--job-name=mcpf_jax-test"] + commands.argv("train.py", workdir, QUICK))
  proc = subprocess.run(argv, env=commands.env(2), capture_output=True, text=True, timeout=e2e.TIMEOUT_S,
                        check=False)
  runs = [e2e.Run(f"srun.{i}", workdir, proc.returncode, (commands.root / f"srun.{i}.stdout").read_text(),
                  (commands.root / f"srun.{i}.stderr").read_text(), 0.0) for i in range(2)]
  assert proc.returncode == 0, (proc.stderr[-2000:], runs[0].stderr[-3000:], runs[1].stderr[-3000:])
  return runs


@pytest.mark.slurm
def test_srun_with_no_launch_flag_forms_one_job(srun_run):
  _one_job(srun_run, "train.py")
  summary = json.loads((srun_run[0].workdir / "train_summary.json").read_text())
  assert summary["processes"] == 2 and summary["devices"] == 4 and summary["step"] == srun_run[0].json()["step"]


@pytest.mark.slurm
def test_the_slurm_variables_alone_make_one_two_process_job(commands, srun_run):
  job = _job_id()
  runs = commands.run_processes("env", "eval.py", srun_run[0].workdir, QUICK, launch_flags=False,
                                env=lambda i: _step(job, i))
  _one_job(runs, "eval.py")
  assert runs[0].json()["num_images"] == 32


@pytest.mark.parametrize("script,variables,extra,match", [
    # An sbatch script that runs python itself: the job's variables (SLURM_NTASKS=2), no job step.
    ("train.py", {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                  "SLURM_JOB_NODELIST": "localhost"}, (),
     "train.py: SLURM (SLURM_NTASKS=2) says this job has 2 tasks, but this process would run alone (no launch "
     "flag, and no cluster environment that jax detects): each task would train by itself on the same workdir. "
     "Fix: no job step runs this process (no SLURM_STEP_NODELIST): an sbatch / salloc script that runs python "
     "itself starts one task, not SLURM_NTASKS. Start every task with `srun python ...`"),
    ("eval.py", _step(7, 1), ("--nodistributed",),
     "eval.py: SLURM job step (SLURM_NTASKS=2) says this job has 2 tasks, but this process would run alone "
     "(--nodistributed): each task would train by itself on the same workdir. Fix: leave out --nodistributed"),
], ids=["sbatch-without-srun", "nodistributed-in-a-step"])
def test_a_start_that_would_run_alone_is_refused_before_writing(commands, tmp_path, script, variables, extra, match):
  workdir = tmp_path / "run"
  run = commands.run("refused", script, workdir, QUICK, extra=extra, env=variables)
  assert run.returncode == 2, run.stderr[-3000:]
  assert match in run.stderr, run.stderr[-3000:]
  assert not workdir.exists(), sorted(workdir.rglob("*"))
