"""The README's main-job command (`make smoke`) runs as written: Makefile -> train.py -> eval.py, offline."""

import json
import os
import pathlib
import re
import subprocess
import sys

import e2e_support as e2e
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_readme_names_the_two_commands():
  readme = (REPO / "README.md").read_text()
  block = re.search(r"## The two commands\s+```bash\n(.*?)```", readme, re.S).group(1)
  commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
  assert commands == ["make smoke", "make test"]
  ci = (REPO / ".ci" / "run").read_text()
  assert re.search(r"^make test$", ci, re.M), ".ci/run must run exactly the README's test command"


@pytest.mark.slow
def test_make_smoke_runs_the_main_job(tmp_path):
  """`make smoke`, shortened to one epoch, leaves eval.json and eval_predictions.csv of the held-out photos.

  The shortening is conftest's `smoke_run` (e2e.SMOKE_RUN: one epoch, a checkpoint every 2 steps): the same XLA
  programs, which the session's compilation cache holds once `smoke_run` is built.
  """
  venv = pathlib.Path(sys.prefix)
  workdir = tmp_path / "smoke"
  args = " ".join(f"--config.{k}={v}" for k, v in e2e.SMOKE_RUN.items())
  env = dict(os.environ, CI="true")
  proc = subprocess.run(["make", "-C", str(REPO), "smoke", f"VENV={venv}", f"SMOKE_DIR={workdir}",
                         f"SMOKE_ARGS={args}"], capture_output=True, text=True, env=env, timeout=900, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads((workdir / "eval.json").read_text())
  assert result["dataset"] == "smoke" and result["part"] == "test" and result["num_images"] == 32
  rows = (workdir / "eval_predictions.csv").read_text().splitlines()
  assert rows[0] == "name,mos,score" and len(rows) == 33
  assert (workdir / "eval_scatter.png").stat().st_size > 0
