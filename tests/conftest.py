"""Shared test fixtures.

`test_data`: tests/data, the real label files and the 55-image LIVE Challenge miniature the tests read (each source
with its README and licence; tests/data/README.md). `smoke_run`: one trained and evaluated smoke run per session,
for the tests that need a trained run but no particular config.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import pathlib
import shutil
import tempfile

import ml_collections
import pytest

# The tests run on the CPU backend, also on a machine with chips (which they would otherwise take). The tests that
# run a command as a user types it remove it from that command's environment.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the whole session (the xdist workers and the train.py / eval.py
# subprocesses inherit it): many tests compile the same tiny models, and CPU compiles dominate the suite's time.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="mcpf_jax_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

TEST_DATA = pathlib.Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def test_data() -> pathlib.Path:
  """tests/data: clive-mini/ (LIVE Challenge miniature) and labels/ (label files of other IQA datasets)."""
  return TEST_DATA


@dataclasses.dataclass(frozen=True)
class SmokeRun:
  """A finished smoke run: its workdir, config, train_summary.json and eval.json. Read it; copy it to change it."""
  workdir: pathlib.Path
  config: ml_collections.ConfigDict
  summary: dict
  evaluation: dict


def smoke_run_config():
  """The smoke config cut to one epoch, with a checkpoint every 2 steps (and at the end)."""
  from configs import smoke  # pylint: disable=g-import-not-at-top
  config = smoke.get_config()
  config.train.num_epochs = 1
  config.train.checkpoint_every = 2
  return config


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> SmokeRun:
  """The smoke run of `smoke_run_config`, trained and evaluated once per test session.

  The pytest-xdist workers of one session share it: it lives beside their own temporary folders (the parent of a
  worker's basetemp is the session's), and the first worker to take the lock trains it while the others wait.
  """
  from mcpf_jax.train import evaluation, trainer  # pylint: disable=g-import-not-at-top
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  workdir, done = root / "smoke_run", root / "smoke_run.done"
  config = smoke_run_config()
  with open(root / "smoke_run.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not done.exists():
      shutil.rmtree(workdir, ignore_errors=True)  # what a worker that failed half-way left
      trainer.train_and_evaluate(config, workdir)
      evaluation.evaluate(None, workdir)
      done.touch()
  return SmokeRun(workdir, config, json.loads((workdir / "train_summary.json").read_text()),
                  json.loads((workdir / "eval.json").read_text()))
