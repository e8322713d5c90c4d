"""End to end: a training run kept in a bucket (`--workdir gs://B/run`), against a real GCS-protocol server on
localhost (conftest's `gcs_server`: fake-gcs-server; orbax/tensorstore, gcsfs and google-cloud-storage all reach it).

`train.py --config configs/smoke.py --workdir gs://B/run` as a user types it (the dataset and the tiny CLIP go to
the local cache, $MCPF_JAX_CACHE), SIGKILLed once a checkpoint is committed in the bucket, then run again: it resumes
from that checkpoint. Then `eval.py --workdir gs://B/run`, `score.py --workdir gs://B/run IMAGES` and
`python -m mcpf_jax.export --workdir gs://B/run --output DIR`; eval.py again with the dataset read from a copy in
the bucket (`--config.data.data_dir=gs://B/datasets`). Nothing is written locally under a `gs:` name (the
commands' working directory and the test's folders are searched), the bucket holds the run's whole layout
(TensorBoard events included), and the held-out scores are those of the same config trained in a local workdir
without interruption (conftest's `smoke_run`; <= 1e-5).

Cost: the smoke config cut to `smoke_run`'s (one epoch, 4 steps of 32 images, a checkpoint every 2 steps), so the
XLA programs come from the session's compilation cache when `smoke_run` was built first. Measured on 2 shared cores
(load ~3): the end-to-end test ~97 s wall (killed run 34 s, resumed 20 s, each eval 11-12 s, score 12 s, export 8 s;
`pytest -s` prints them), the other two ~4 s, plus `smoke_run` (~38 s) when no other test built it first.
"""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys
import time

import e2e_support as e2e
import pytest

from mcpf_jax import rundir, runs

pytestmark = pytest.mark.slow


def _finalized_step(fs, checkpoints: str):
  """A condition: a checkpoint step in the bucket is finalized (orbax writes commit_success.txt last on GCS)."""

  def ready() -> bool:
    fs.invalidate_cache()  # the listing changes under this process (train.py writes it)
    try:
      names = fs.ls(checkpoints, detail=False)
    except FileNotFoundError:
      return False
    return any(n.rsplit("/", 1)[-1].isdigit() and fs.exists(f"{n}/commit_success.txt") for n in names)

  return ready


def _predictions(workdir: str, copy: pathlib.Path) -> dict[str, tuple[float, float]]:
  """eval.py's eval_predictions.csv in the bucket ({name: (mos, score)}), through a local copy."""
  copy.write_bytes(rundir.path(f"{workdir}/{rundir.EVAL_PREDICTIONS_FILE}").read_bytes())
  return e2e.predictions(copy.parent, copy.name)


def _gs_names(root: pathlib.Path) -> list[str]:
  return [str(p) for p in root.rglob("*") if any(part.startswith("gs:") for part in p.relative_to(root).parts)]


def test_a_run_in_a_bucket_trains_resumes_evaluates_scores_and_exports(gcs_bucket, smoke_run, tmp_path):
  import gcsfs  # pylint: disable=g-import-not-at-top
  workdir = f"gs://{gcs_bucket}/runs/smoke"
  commands = e2e.Commands(tmp_path, tmp_path / "unused")
  env = dict(commands.env(1), MCPF_JAX_CACHE=str(tmp_path / "cache"))
  train = [sys.executable, "train.py", "--config", e2e.SMOKE, "--workdir", workdir,
           f"--config.train.num_epochs={smoke_run.config.train.num_epochs}",
           f"--config.train.checkpoint_every={smoke_run.config.train.checkpoint_every}"]
  start = time.perf_counter()

  def run(name: str, argv: list[str], ready=None) -> tuple[subprocess.CompletedProcess, dict]:
    began = time.perf_counter()
    with open(tmp_path / f"{name}.out", "w") as out, open(tmp_path / f"{name}.err", "w") as err:
      proc = subprocess.Popen(argv, cwd=e2e.REPO, env=env, stdout=out, stderr=err)
      info = e2e.signal_when([proc], ready, rundir.path(workdir) / "checkpoints", began) if ready else {}
      returncode, cpu = e2e.wait(proc, began + e2e.TIMEOUT_S)
    commands.timings[name] = (time.perf_counter() - began, cpu)
    done = subprocess.CompletedProcess(argv, returncode, (tmp_path / f"{name}.out").read_text(),
                                       (tmp_path / f"{name}.err").read_text())
    return done, info

  def check(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, f"{done.args[1:3]} exited with {done.returncode}:\n{done.stderr[-4000:]}"
    return done

  fs = gcsfs.GCSFileSystem()
  checkpoints = f"{gcs_bucket}/runs/smoke/checkpoints"
  try:
    killed, info = run("train:killed", train, ready=_finalized_step(fs, checkpoints))
    assert info.get("killed"), f"the run ended before a checkpoint was committed:\n{killed.stderr[-3000:]}"
    assert killed.returncode == -signal.SIGKILL
    fs.invalidate_cache()
    at_kill = sorted(int(n.rsplit("/", 1)[-1]) for n in fs.ls(checkpoints, detail=False)
                     if n.rsplit("/", 1)[-1].isdigit())
    assert at_kill and max(at_kill) < smoke_run.summary["step"]

    resumed = check(run("train", train)[0])
    assert f"resumed from {workdir}/checkpoints/" in resumed.stderr
    summary = json.loads(rundir.path(f"{workdir}/train_summary.json").read_text())
    assert summary["step"] == smoke_run.summary["step"]

    evaluated = check(run("eval", [sys.executable, "eval.py", "--workdir", workdir])[0])
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    scores = _predictions(workdir, tmp_path / "eval_predictions.csv")
    # The same evaluation with the dataset read from a copy in the bucket (data.data_dir may move: its fingerprint
    # is checked), through the whole input pipeline.
    fs.put(str(tmp_path / "cache" / "data" / "csv"), f"{gcs_bucket}/datasets/", recursive=True)
    check(run("eval:data-in-bucket", [sys.executable, "eval.py", "--config", e2e.SMOKE, "--workdir", workdir,
                                      f"--config.data.data_dir=gs://{gcs_bucket}/datasets"])[0])
    scores_from_bucket = _predictions(workdir, tmp_path / "eval_predictions.data-in-bucket.csv")
    images = sorted((tmp_path / "cache" / "data" / "smoke_release" / "images").glob("*.png"))[:3]
    scored = check(run("score", [sys.executable, "score.py", "--workdir", workdir, *map(str, images)])[0])
    exported = check(run("export", [sys.executable, "-m", "mcpf_jax.export", "--workdir", workdir, "--output",
                                    str(tmp_path / "exported")])[0])
  finally:
    e2e.report_timings(commands, start, "gs:// run folder")

  # The run's layout, in the bucket.
  fs.invalidate_cache()
  found = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{gcs_bucket}/runs/smoke", detail=False)}
  assert found == {"run.json", "split.json", "checkpoints", "tensorboard", "train_summary.json",
                   "test_predictions.csv", "eval.json", "eval_predictions.csv", "eval_scatter.png"}
  events = b"".join(fs.cat(e) for e in fs.ls(f"{gcs_bucket}/runs/smoke/tensorboard", detail=False))
  assert b"train/loss" in events and b"test/srcc" in events
  # Nothing local under a gs: name: the commands ran in the repository; the caches and outputs are in tmp_path.
  assert [p for p in e2e.REPO.iterdir() if p.name.startswith("gs:")] == [] and _gs_names(tmp_path) == []
  assert (tmp_path / "cache" / "tiny_clip").is_dir()

  # The same held-out scores as the uninterrupted local run of the same config (and eval.py's best checkpoint).
  local = e2e.predictions(smoke_run.workdir)
  for remote in (scores, scores_from_bucket):
    assert sorted(local) == sorted(remote)
    assert max(abs(local[k][1] - remote[k][1]) for k in local) <= 1e-5
  assert result["checkpoint_step"] == smoke_run.evaluation["checkpoint_step"]
  assert abs(result["srcc"] - smoke_run.evaluation["srcc"]) <= 1e-5

  rows = scored.stdout.strip().splitlines()
  assert rows[0].startswith("path,score") and len(rows) == 1 + len(images)
  out = json.loads(exported.stdout.strip().splitlines()[-1])
  assert out["step"] == result["checkpoint_step"] and "model.safetensors" in out["files"]
  assert gcs_bucket not in (tmp_path / "exported" / "config.json").read_text()  # no path of the run's storage


def test_a_dataset_in_a_bucket_reads_as_its_local_copy(gcs_bucket, smoke_run):
  """A prepared dataset copied to a bucket (`data.data_dir=gs://...`) opens through TFDS's builder_from_directory
  and array_record's own gs:// reader: same records, same identity; building into a bucket is refused by name."""
  import gcsfs  # pylint: disable=g-import-not-at-top

  from mcpf_jax.train import data_setup, identity  # pylint: disable=g-import-not-at-top
  local_dir = smoke_run.workdir / "data"
  built = local_dir / "csv"
  fs = gcsfs.GCSFileSystem()
  fs.put(str(built), f"{gcs_bucket}/datasets/", recursive=True)
  config = smoke_run.config.copy_and_resolve_references()
  with config.unlocked():
    config.data.data_dir = f"gs://{gcs_bucket}/datasets"
  remote = data_setup.open_source(config, config.data.name, smoke_run.workdir)
  with config.unlocked():
    config.data.data_dir = str(local_dir)
  local = data_setup.open_source(config, config.data.name, smoke_run.workdir)
  assert str(remote.path).startswith(f"gs://{gcs_bucket}/datasets/csv/smoke/")
  assert len(remote) == len(local) and list(remote.names) == list(local.names)
  for i in (0, len(local) // 2, len(local) - 1):
    a, b = remote[i], local[i]
    assert a["image"] == b["image"] and a["name"] == b["name"] and a["mos"] == b["mos"]
  ours, theirs = identity.dataset_identity(remote, "smoke"), identity.dataset_identity(local, "smoke")
  assert {k: v for k, v in ours.items() if k != "path"} == {k: v for k, v in theirs.items() if k != "path"}

  with config.unlocked():
    config.data.data_dir = f"gs://{gcs_bucket}/elsewhere"
  with pytest.raises(FileNotFoundError, match=r"data.data_dir=gs://.*/elsewhere: dataset csv is not built there, and "
                                              r"datasets are built into a local folder"):
    data_setup.open_source(config, config.data.name, smoke_run.workdir)


def test_checkpoints_kept_apart_from_the_run_folder(gcs_bucket, smoke_run, tmp_path):
  """config.checkpoint_dir: a run whose run.json puts its checkpoints in another place (here: the run folder in a
  bucket, the checkpoints in a local folder) is found there by the Scorer; a restart that forgot checkpoint_dir is
  refused instead of training again from step 0."""
  import shutil  # pylint: disable=g-import-not-at-top

  from mcpf_jax.scoring import Scorer  # pylint: disable=g-import-not-at-top
  from mcpf_jax.train import identity, trainer  # pylint: disable=g-import-not-at-top
  elsewhere = tmp_path / "ckpts"
  shutil.copytree(smoke_run.workdir / "checkpoints", elsewhere)
  workdir = rundir.path(f"gs://{gcs_bucket}/run")
  saved_run, saved_split = identity.read(smoke_run.workdir)
  saved_run["config"]["checkpoint_dir"] = str(elsewhere)
  identity.write(workdir, saved_run, saved_split)
  assert str(runs.checkpoint_dir(workdir)) == str(elsewhere)
  scorer = Scorer.from_checkpoint(str(workdir), "latest", num_workers=0)
  assert scorer.info["checkpoint"] == str(elsewhere / str(smoke_run.summary["step"]))

  with pytest.raises(identity.RunMismatchError, match=rf"this run's checkpoints are in {elsewhere} \(its run.json\), "
                                                      r"not in gs://.*/run/checkpoints; nothing was changed"):
    trainer._saved_identity(workdir, rundir.checkpoint_dir(workdir))  # pylint: disable=protected-access
