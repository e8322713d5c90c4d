"""Multi-host for real, on one machine: 2 jax processes x 2 CPU devices on localhost (gloo collectives), and
preemption (SIGTERM) of one- and two-process runs.

Every run is the smoke run cut to one epoch (9 steps of 16 images, a checkpoint every 3 steps), launched the way a
cluster launches it (`--coordinator_address 127.0.0.1:PORT --num_processes 2 --process_id I`). Checks:
- the 2-process run's held-out scores equal the 1-process run's (relative difference <= 1e-3) and every process
  logs the same topology (2 processes, 4 devices);
- evaluation is sharded: each process decodes only its half of the images (its log line counts them), and
  eval.py on 2 processes gives the 1-process scores;
- the input follows the mesh's data axis, not the process index: 2 processes x 1 device with the model axis
  spanning them (mesh.data=1, mesh.model=2, the backbone's large leaves stored split over it: mesh.shard_backbone)
  train on the 1-process batches (each process loads the whole batch) and give the 1-process scores; eval.py on
  that run with mesh.data=2, mesh.model=1 (each process its half) and an eval.batch_size of 5 (rounded up to 6,
  the last batch padded) scores every image as the 1-process eval.py does;
- one of 2 processes SIGKILLed after the first checkpoint: the other fails within the configured heartbeat
  timeout, naming the lost task; both started again resume exactly (<= 1e-5 from the uninterrupted 2-process run);
- SIGTERM: a checkpoint at the step reached, exit 143 within seconds; the same command again finishes with the
  uninterrupted run's scores (<= 1e-5); under 2 processes (SIGTERM to one of them) both save the same step.
- a host maintenance event (TERMINATE_ON_HOST_MAINTENANCE) announced mid-run by a fake GCE metadata server
  (tests/metadata_server.py, GCE_METADATA_HOST) to 2 processes: both save the same step and exit 143, saying
  which event stopped them; the same command (the server back at NONE) gives the uninterrupted 2-process scores.
Two lanes of subprocesses (the 1-process runs, the 2-process runs) share the session's smoke dataset, the
session's compilation cache and its 1-process run with its eval.py (conftest `e2e_shared`; read, never written).
"""

from __future__ import annotations

import json
import math
import re
import signal
import time

import e2e_support as e2e
import pytest
from metadata_server import MetadataServer

pytestmark = pytest.mark.slow

HEARTBEAT_S = 10  # the peer-loss test's --heartbeat_timeout_seconds
MAINTENANCE = "TERMINATE_ON_HOST_MAINTENANCE"
# 2 processes x 1 device: the model axis spans the processes, with the backbone's large leaves (the token embeddings:
# 49,408 x 64) stored split over it (mesh.shard_backbone, FSDP: mesh.GatherOnce spreads each batch over both).
MODEL_AXIS = {"mesh.data": 1, "mesh.model": 2, "mesh.shard_backbone": True}
# eval.batch_size 5 -> 6 on 2 data devices: 3 rows per process, so the 16 test images of each end in padding.
DATA_AXIS = {"mesh.data": 2, "mesh.model": 1, "eval.batch_size": 5}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, e2e_shared) -> e2e.Runs:
  root = tmp_path_factory.mktemp("mp")
  start = time.perf_counter()
  c = e2e.Commands(root, e2e_shared.data())
  c.timings["smoke data (shared)"] = (time.perf_counter() - start, math.nan)
  term = signal.SIGTERM
  metadata = MetadataServer().start()
  on_gce = lambda i: {"GCE_METADATA_HOST": metadata.host}
  lane1 = e2e.Lane([
      # The session's 1-process run and its eval.py (test_train_e2e's too; whichever module asks first makes them).
      ("one", e2e_shared.one),
      ("one:eval", e2e_shared.one_eval),
      ("term", lambda: _listed(c.run("term", "train.py", root / "term", signal_after_step=term))),
      ("term:again", lambda: c.run("term:again", "train.py", root / "term")),
      # The model axis across the processes (one device each), then eval.py with the data axis across them.
      ("model2", lambda: c.run_processes("model2", "train.py", root / "model2", MODEL_AXIS, devices=1)),
      ("model2:eval", lambda: c.run_processes("model2:eval", "eval.py", root / "model2", DATA_AXIS, devices=1)),
      # Announced once process 0 trained a step; the rerun sees NONE.
      ("maint", lambda: _listed(c.run_processes("maint", "train.py", root / "maint", env=on_gce,
                                                after_step=lambda: metadata.announce(MAINTENANCE)))),
      ("maint:again", lambda: (metadata.announce("NONE"),
                               c.run_processes("maint:again", "train.py", root / "maint", env=on_gce))[1]),
  ])
  lane2 = e2e.Lane([
      ("two", lambda: c.run_processes("two", "train.py", root / "two")),
      ("two:eval", lambda: c.run_processes("two:eval", "eval.py", root / "two")),
      ("peer", lambda: c.run_processes("peer", "train.py", root / "peer", signal_after_checkpoint=signal.SIGKILL,
                                       targets=(1,), extra=(f"--heartbeat_timeout_seconds={HEARTBEAT_S}",))),
      ("peer:again", lambda: c.run_processes("peer:again", "train.py", root / "peer")),
      # Early in the run: jax's preemption service needs a few steps to agree on the step to stop at.
      ("term2", lambda: _listed(c.run_processes("term2", "train.py", root / "term2", signal_after_step=term,
                                                targets=(1,)))),
      ("term2:again", lambda: c.run_processes("term2:again", "train.py", root / "term2")),
  ])
  yield e2e.Runs(c, [lane1, lane2])
  for lane in (lane1, lane2):
    lane.thread.join(timeout=3 * e2e.TIMEOUT_S)
  metadata.stop()
  e2e.report_timings(c, start, "multi-process runs (two lanes)")


def _listed(run):
  """Records the committed checkpoint steps right after the run (a later resumed run may delete some)."""
  first = run[0] if isinstance(run, list) else run
  first.info["checkpoints_after"] = sorted(int(p.name) for p in (first.workdir / "checkpoints").iterdir()
                                           if p.name.isdigit())
  return run


def _check_all(procs: list[e2e.Run]) -> list[e2e.Run]:
  for r in procs:
    r.check()
  return procs


def _saved_step(run: e2e.Run, reason: str = "on a signal") -> int:
  m = re.search(rf"stopped {reason} (?:at step \d+|during the validation of step \d+); saved step (\d+) in",
                run.stderr)
  assert m, f"{run.name}: no 'saved step' line:\n{run.stderr[-3000:]}"
  return int(m.group(1))


TEST = "test_predictions.csv"  # train.py's per-image scores of the test split at the final step


def test_two_processes_give_the_one_process_scores_and_log_their_topology(runs):
  one, two = runs["one"].check(), _check_all(runs["two"])
  for i, r in enumerate(two):
    assert re.search(rf"process {i} of 2 processes: 2 local / 4 global devices \(cpu", r.stderr), r.stderr[-3000:]
    assert r.json()["devices"] == 4
  assert re.search(r"process 0 of 1 processes: 1 local / 1 global devices", one.stderr)
  diff = e2e.max_relative_difference(e2e.predictions(two[0].workdir, TEST), e2e.predictions(one.workdir, TEST))
  assert diff <= 1e-3, f"2 processes vs 1: max relative score difference {diff:.2e}"
  summary = json.loads((two[0].workdir / "train_summary.json").read_text())
  assert summary["processes"] == 2 and summary["devices"] == 4
  # Only process 0 writes the summaries and the TensorBoard events (one event file, not two).
  assert len(list((two[0].workdir / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_evaluation_is_sharded_over_the_processes(runs):
  one, two = runs["one:eval"].check(), _check_all(runs["two:eval"])
  n = one.json()["num_images"]
  for i, r in enumerate(two):
    assert re.search(rf"evaluated {n} images; this process \({i} of 2, data shard {i} of 2\) decoded {n // 2} of "
                     "them", r.stderr), r.stderr[-3000:]
    assert r.json()["srcc"] == pytest.approx(one.json()["srcc"], abs=1e-6)
  assert re.search(rf"evaluated {n} images; this process \(0 of 1, data shard 0 of 1\) decoded {n} of them",
                   one.stderr)
  # eval.py on 2 processes scores every image as the 1-process eval.py does.
  a = e2e.predictions(runs["two"][0].workdir)
  b = e2e.predictions(runs["one"].workdir)
  assert len(a) == n and e2e.max_relative_difference(a, b) <= 1e-3


def test_the_model_axis_across_processes_trains_on_the_one_process_batches(runs):
  one, model2 = runs["one"].check(), _check_all(runs["model2"])
  n = len(e2e.predictions(one.workdir, TEST))
  for i, r in enumerate(model2):
    assert re.search(rf"process {i} of 2 processes: 1 local / 2 global devices \(cpu.*mesh data=1 x model=2",
                     r.stderr), r.stderr[-3000:]
    # Both processes hold the whole batch (one data shard): each decodes every test image.
    assert re.search(rf"evaluated {n} images; this process \({i} of 2, data shard 0 of 1\) decoded {n} of them",
                     r.stderr), r.stderr[-3000:]
  diff = e2e.max_relative_difference(e2e.predictions(model2[0].workdir, TEST), e2e.predictions(one.workdir, TEST))
  assert diff <= 1e-3, f"mesh.data=1 x mesh.model=2 on 2 processes vs 1 process: max relative difference {diff:.2e}"


def test_the_data_axis_across_processes_evaluates_with_a_rounded_padded_batch(runs):
  one, evals = runs["one:eval"].check(), _check_all(runs["model2:eval"])
  n = one.json()["num_images"]
  for i, r in enumerate(evals):
    assert "eval.batch_size=5 -> 6: rounded up to a multiple of the mesh's data axis (2 devices)" in r.stderr
    assert re.search(rf"evaluated {n} images; this process \({i} of 2, data shard {i} of 2\) decoded "
                     rf"{(n + 1 - i) // 2} of them", r.stderr), r.stderr[-3000:]
    assert r.json()["num_images"] == n
  a, b = e2e.predictions(evals[0].workdir), e2e.predictions(one.workdir)
  assert len(a) == n and e2e.max_relative_difference(a, b) <= 1e-3


def test_a_lost_peer_fails_the_other_within_the_heartbeat_timeout(runs):
  survivor, killed = runs["peer"]
  assert killed.info["killed"] and killed.returncode == -signal.SIGKILL
  assert survivor.returncode not in (0, None), survivor.stderr[-2000:]
  assert survivor.info["exited_after_signal_s"] <= HEARTBEAT_S + 20, survivor.info
  assert re.search(r"tasks are unhealthy \(stopped sending heartbeats\):\s*1", survivor.stderr), \
      survivor.stderr[-3000:]


def test_two_processes_killed_and_started_again_resume_exactly(runs):
  two, again = _check_all(runs["two"]), _check_all(runs["peer:again"])
  assert re.search(r"resumed from \S+/checkpoints/\d+", again[0].stderr), again[0].stderr[-3000:]
  diff = e2e.max_relative_difference(e2e.predictions(again[0].workdir, TEST), e2e.predictions(two[0].workdir, TEST))
  assert diff <= 1e-5, f"resumed vs uninterrupted (2 processes): max relative score difference {diff:.2e}"


def test_sigterm_saves_the_step_reached_and_the_same_command_finishes_the_run(runs):
  one, term, again = runs["one"].check(), runs["term"], runs["term:again"].check()
  assert term.info["killed"], "the run finished before a checkpoint could be seen"
  assert term.returncode == 143, (term.returncode, term.stderr[-3000:])
  assert term.info["exited_after_signal_s"] < 20, term.info
  step = _saved_step(term)
  assert term.info["checkpoints_after"][-1] == step, term.info
  assert re.search(rf"resumed from \S+/checkpoints/{step}\b", again.stderr), again.stderr[-3000:]
  assert not (term.workdir / "checkpoints" / f"{step}.orbax-checkpoint-tmp").exists()
  diff = e2e.max_relative_difference(e2e.predictions(again.workdir, TEST), e2e.predictions(one.workdir, TEST))
  assert diff <= 1e-5, f"preempted + resumed vs uninterrupted: max relative score difference {diff:.2e}"


def test_sigterm_to_one_of_two_processes_saves_the_same_step_on_both(runs):
  two, term, again = _check_all(runs["two"]), runs["term2"], _check_all(runs["term2:again"])
  assert term[0].info["killed"]
  assert [r.returncode for r in term] == [143, 143], [r.stderr[-2000:] for r in term]
  steps = {_saved_step(r) for r in term}
  assert len(steps) == 1, steps
  step = steps.pop()
  assert term[0].info["checkpoints_after"][-1] == step, term[0].info
  assert re.search(rf"resumed from \S+/checkpoints/{step}\b", again[0].stderr)
  diff = e2e.max_relative_difference(e2e.predictions(again[0].workdir, TEST), e2e.predictions(two[0].workdir, TEST))
  assert diff <= 1e-5, f"preempted + resumed vs uninterrupted (2 processes): {diff:.2e}"


def test_a_maintenance_event_stops_both_processes_at_the_same_step(runs):
  two, maint, again = _check_all(runs["two"]), runs["maint"], _check_all(runs["maint:again"])
  assert maint[0].info["killed"], "the run finished before the event could be announced"
  assert [r.returncode for r in maint] == [143, 143], [r.stderr[-2000:] for r in maint]
  for r in maint:
    assert f"maintenance event {MAINTENANCE} from 127.0.0.1" in r.stderr, r.stderr[-3000:]
    assert "stopped on a signal" not in r.stderr
  steps = {_saved_step(r, f"for the maintenance event {MAINTENANCE}") for r in maint}
  assert len(steps) == 1, steps
  step = steps.pop()
  assert maint[0].info["checkpoints_after"][-1] == step, maint[0].info
  assert re.search(rf"resumed from \S+/checkpoints/{step}\b", again[0].stderr)
  diff = e2e.max_relative_difference(e2e.predictions(again[0].workdir, TEST), e2e.predictions(two[0].workdir, TEST))
  assert diff <= 1e-5, f"maintenance stop + resumed vs uninterrupted (2 processes): {diff:.2e}"
