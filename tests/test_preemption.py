"""The stop request of one process (real signals to this process) and the launch flags' checks.

The multi-process path (jax's preemption sync point: every process stops at the same step) runs in
test_multiprocess.py, with real processes.
"""

import os
import signal

import pytest
from absl import flags

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


def test_one_process_needs_no_launch(launch_flags):
  assert launch.initialize() is False


def test_an_incomplete_explicit_launch_is_refused(launch_flags):
  launch_flags["coordinator_address"].value = "127.0.0.1:1234"
  with pytest.raises(ValueError, match="go together"):
    launch.initialize()
  launch_flags["num_processes"].value = 2
  launch_flags["process_id"].value = 2
  with pytest.raises(ValueError, match="--process_id=2 must be in 0..1"):
    launch.initialize()
