"""The stop request of one process (real signals to this process; maintenance events from a fake metadata server
over HTTP) and the launch flags' checks, with the scheduler's variables in this process's environment.

The multi-process path (jax's preemption sync point: every process stops at the same step, on a signal or a
maintenance event) runs in test_multiprocess.py, with real processes; real SLURM launches in test_cluster.py.
"""

import os
import signal
import time

import pytest
from absl import flags
from metadata_server import MetadataServer

from mcpf_jax.train import launch, preemption


@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_becomes_a_stop_request_at_the_next_poll(sig, status):
  before = signal.getsignal(sig)
  with preemption.StopRequest() as stop:
    assert not stop.distributed
    assert not stop.poll() and not stop.poll()
    os.kill(os.getpid(), sig)  # delivered to the Python handler before the next bytecode
    assert stop.poll() and stop.poll()  # and stays requested
    assert stop.status == status
  assert signal.getsignal(sig) is before  # the previous handler is back


def _wait(condition, timeout_s=10.0):
  deadline = time.monotonic() + timeout_s
  while not condition():
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.02)


def test_a_maintenance_event_stops_the_run_and_a_live_migration_does_not(monkeypatch, caplog):
  with MetadataServer() as server:
    monkeypatch.setenv("GCE_METADATA_HOST", server.host)
    watcher = preemption.MaintenanceWatcher.for_host(server.host)
    try:
      with preemption.StopRequest() as stop:
        _wait(lambda: watcher.value == "NONE")
        assert not stop.poll()
        server.announce("MIGRATE_ON_HOST_MAINTENANCE")  # live migration: the VM keeps running
        _wait(lambda: watcher.value == "MIGRATE_ON_HOST_MAINTENANCE")
        assert not stop.poll() and stop.event is None
        server.announce("TERMINATE_ON_HOST_MAINTENANCE")
        _wait(stop.poll)
        assert stop.poll() and stop.signum is None and stop.status == 143
        assert stop.reason == "for the maintenance event TERMINATE_ON_HOST_MAINTENANCE"
      # A request made after the event was announced (e.g. evaluation after training) stops at once.
      with preemption.StopRequest() as again:
        assert again.poll()
      assert "maintenance event TERMINATE_ON_HOST_MAINTENANCE from 127.0.0.1" in caplog.text
      assert "live-migrated and keeps running" in caplog.text
      assert server.requests >= 3  # long polls: one answer per change, not a request per step
    finally:
      watcher.close()


def test_no_metadata_server_off_gce(monkeypatch):
  monkeypatch.delenv("GCE_METADATA_HOST", raising=False)
  on_gce = os.path.exists("/sys/class/dmi/id/product_name") and open(
      "/sys/class/dmi/id/product_name").read().startswith("Google")
  assert preemption.metadata_host() == ("169.254.169.254" if on_gce else None)


def test_exit_statuses_are_128_plus_the_signal():
  assert preemption.EXIT_STATUS == {signal.SIGTERM: 143, signal.SIGINT: 130}


@pytest.fixture
def launch_flags():
  saved = {n: flags.FLAGS[n].value for n in ("distributed", "coordinator_address", "num_processes", "process_id")}
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  yield flags.FLAGS
  for n, v in saved.items():
    flags.FLAGS[n].value = v


CLUSTER_VARIABLES = ("SLURM_", "OMPI_", "PMI_", "KUBERNETES_SERVICE_HOST", "TPU_WORKER_HOSTNAMES",
                     "TPU_PROCESS_ADDRESSES")


@pytest.fixture
def no_cluster(monkeypatch):
  for name in list(os.environ):
    if name.startswith(CLUSTER_VARIABLES):
      monkeypatch.delenv(name)
  return monkeypatch


def test_one_process_needs_no_launch(launch_flags, no_cluster):
  assert launch.detect_cluster() is None
  assert launch.initialize() is False


def test_distributed_without_a_cluster_is_refused(launch_flags, no_cluster):
  launch_flags["distributed"].value = True
  with pytest.raises(launch.LaunchError, match="--distributed: jax detects no cluster environment here"):
    launch.initialize()


SLURM_STEP = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1",
              "SLURM_STEP_NODELIST": "localhost", "SLURM_STEP_NUM_TASKS": "2"}


def test_jax_detects_a_slurm_step_and_nodistributed_there_is_refused(launch_flags, no_cluster):
  for k, v in SLURM_STEP.items():
    no_cluster.setenv(k, v)
  assert launch.detect_cluster().__name__ == "SlurmCluster"
  launch_flags["distributed"].value = False
  with pytest.raises(launch.LaunchError, match=r"SLURM job step \(SLURM_NTASKS=2\) says this job has 2 tasks, but "
                     r"this process would run alone \(--nodistributed\).*Fix: leave out --nodistributed"):
    launch.initialize()


@pytest.mark.parametrize("variables,match", [
    # An sbatch script that runs python itself: the job's variables, no job step.
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
      "SLURM_JOB_NODELIST": "localhost"}, r"SLURM \(SLURM_NTASKS=2\).*`srun python \.\.\.`"),
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "0"},
     r"Open MPI \(OMPI_COMM_WORLD_SIZE=4\) says this job has 4 tasks.*--num_processes=\$OMPI_COMM_WORLD_SIZE"),
])
def test_several_tasks_that_jax_does_not_detect_are_refused(launch_flags, no_cluster, variables, match):
  for k, v in variables.items():
    no_cluster.setenv(k, v)
  assert launch.detect_cluster() is None
  with pytest.raises(launch.LaunchError, match=match):
    launch.initialize()


def test_an_incomplete_explicit_launch_is_refused(launch_flags):
  launch_flags["coordinator_address"].value = "127.0.0.1:1234"
  with pytest.raises(launch.LaunchError, match="go together"):
    launch.initialize()
  launch_flags["num_processes"].value = 2
  launch_flags["process_id"].value = 2
  with pytest.raises(launch.LaunchError, match="--process_id=2 must be in 0..1"):
    launch.initialize()
