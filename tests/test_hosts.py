"""Hosts with their own disks, for real: 2 jax processes on localhost (gloo collectives), each with its own working
directory, home, temporary folder, local cache ($MCPF_JAX_CACHE) and compilation cache, so that nothing local is
shared between them, as on two machines.

- A run folder in a bucket (`--workdir gs://B/run`, the local GCS-protocol server of conftest) and nothing else
  shared: each host builds the smoke dataset and the tiny CLIP in its own cache, process 0 alone reads and writes
  the run's files; train.py then eval.py on the 2 processes give the held-out scores of the 1-process local run of
  the same config (conftest's `smoke_run`, <= 1e-3).
- A run folder that is not one folder for both (the same relative --workdir on each host's own disk) is refused by
  both processes before anything is written, naming the processes that do not see process 0's folder.
- Each host's own copy of a dataset must be the same build: a copy that differs (here: one host's copy stored at
  another short side) is refused by both processes, naming the field and both values.

Cost on 2 shared cores: the bucket run ~60-90 s (two processes compile on 2 cores), each refusal ~10-15 s, plus
`smoke_run` when no other test built it first.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
import time

import e2e_support as e2e
import pytest

from mcpf_jax import rundir

pytestmark = pytest.mark.slow


def _hosts(root: pathlib.Path, processes: int = 2) -> list[pathlib.Path]:
  """Each host's own folder: its working directory, home, temp, caches."""
  out = []
  for i in range(processes):
    host = root / f"host{i}"
    for sub in ("home", "tmp", "cache", "jax_cache"):
      (host / sub).mkdir(parents=True, exist_ok=True)
    out.append(host)
  return out


def _launch(name: str, script: str, args: list[str], hosts: list[pathlib.Path], root: pathlib.Path
            ) -> list[e2e.Run]:
  """`script` as len(hosts) processes of one job (explicit launch flags), process i in hosts[i] with only that
  folder's local state. Returns one e2e.Run per process (its `workdir` is its host folder)."""
  port = e2e.free_port()
  start = time.perf_counter()
  procs = []
  for i, host in enumerate(hosts):
    env = e2e.Commands(root, root).env(1, {
        "HOME": str(host / "home"), "TMPDIR": str(host / "tmp"), "MCPF_JAX_CACHE": str(host / "cache"),
        "JAX_COMPILATION_CACHE_DIR": str(host / "jax_cache")})
    argv = [sys.executable, str(e2e.REPO / script), *args, f"--coordinator_address=127.0.0.1:{port}",
            f"--num_processes={len(hosts)}", f"--process_id={i}"]
    out, err = open(root / f"{name}.{i}.stdout", "w"), open(root / f"{name}.{i}.stderr", "w")
    procs.append((subprocess.Popen(argv, cwd=host, env=env, stdout=out, stderr=err), out, err))
  runs = []
  for i, (proc, out, err) in enumerate(procs):
    returncode, _ = e2e.wait(proc, start + e2e.TIMEOUT_S)
    out.close()
    err.close()
    runs.append(e2e.Run(f"{name}.{i}", hosts[i], returncode, (root / f"{name}.{i}.stdout").read_text(),
                        (root / f"{name}.{i}.stderr").read_text(), time.perf_counter() - start))
  print(f"{name}: {time.perf_counter() - start:.1f} s")
  return runs


def _smoke_args(workdir: str, config, **overrides) -> list[str]:
  fields = {"train.num_epochs": config.train.num_epochs, "train.checkpoint_every": config.train.checkpoint_every,
            **overrides}
  return ["--config", e2e.SMOKE, "--workdir", workdir] + [f"--config.{k}={v}" for k, v in fields.items()]


def test_hosts_with_their_own_disks_train_and_evaluate_a_run_in_a_bucket(gcs_bucket, smoke_run, tmp_path):
  workdir = f"gs://{gcs_bucket}/runs/smoke"
  hosts = _hosts(tmp_path)
  for r in _launch("train", "train.py", _smoke_args(workdir, smoke_run.config), hosts, tmp_path):
    r.check()
  for r in _launch("eval", "eval.py", ["--workdir", workdir], hosts, tmp_path):
    r.check()

  # Each host built its own dataset copy and tiny CLIP; nothing landed in a working directory or a shared place.
  for host in hosts:
    assert (host / "cache" / "data" / "csv").is_dir() and (host / "cache" / "tiny_clip").is_dir()
    assert sorted(p.name for p in host.iterdir()) == ["cache", "home", "jax_cache", "tmp"]
  assert not list(tmp_path.glob("host*/cache/data/.mcpf-host-*"))  # the sharing markers are gone

  local = e2e.predictions(smoke_run.workdir, "test_predictions.csv")
  copy = tmp_path / "test_predictions.csv"
  copy.write_bytes(rundir.path(f"{workdir}/test_predictions.csv").read_bytes())
  remote = e2e.predictions(tmp_path, copy.name)
  assert sorted(local) == sorted(remote)
  assert e2e.max_relative_difference(local, remote) <= 1e-3
  copy = tmp_path / "eval_predictions.csv"
  copy.write_bytes(rundir.path(f"{workdir}/eval_predictions.csv").read_bytes())
  evaluated = e2e.predictions(tmp_path, copy.name)
  assert e2e.max_relative_difference(e2e.predictions(smoke_run.workdir), evaluated) <= 1e-3


def test_a_run_folder_each_host_has_its_own_copy_of_is_refused(smoke_run, tmp_path):
  hosts = _hosts(tmp_path)
  runs = _launch("refused", "train.py", _smoke_args("run", smoke_run.config), hosts, tmp_path)
  for r in runs:
    assert r.returncode == 1, f"{r.name} exited with {r.returncode}:\n{r.stderr[-3000:]}"
    assert "the run folder (--workdir) is not one folder for all 2 processes: process(es) 1 do not see what " \
           "process 0 writes there" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
  for host in hosts:
    assert not (host / "run").exists()  # a refused start leaves nothing behind


def test_hosts_reading_different_builds_of_a_dataset_are_refused(smoke_run, tmp_path):
  hosts = _hosts(tmp_path)
  for host in hosts:  # each host's own copy of the prepared dataset, at the same relative path
    shutil.copytree(smoke_run.workdir / "data" / "csv", host / "data" / "csv")
  # Host 1's copy says its images are stored at a short side of 256 (a `prepare --resize 256` build): readable by
  # this config (data.resize=256), but another build than host 0's.
  meta = next((hosts[1] / "data" / "csv").rglob("metadata.json"))
  record = json.loads(meta.read_text())
  record["resize"] = smoke_run.config.data.resize
  meta.write_text(json.dumps(record))
  workdir = tmp_path / "shared_run"
  runs = _launch("different", "train.py", _smoke_args(str(workdir), smoke_run.config, **{"data.data_dir": "data"}),
                 hosts, tmp_path)
  for r in runs:
    assert r.returncode == 1, f"{r.name} exited with {r.returncode}:\n{r.stderr[-3000:]}"
    assert "dataset smoke differs between the processes: process(es) 1 read another one than process 0" in r.stderr
    assert f"stored_short_side: process 0 null, process 1 {smoke_run.config.data.resize}" in r.stderr, r.stderr[-3000:]
  assert not (workdir / rundir.RUN_FILE).exists() and not (workdir / rundir.CHECKPOINTS).exists()
