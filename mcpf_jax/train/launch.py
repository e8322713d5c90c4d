"""Starting train.py / eval.py on one or many hosts: the launch flags, jax.distributed, the topology line.

One process: nothing to do. Many (TPU pods, SLURM / Open MPI GPU clusters): `--distributed` lets
`jax.distributed.initialize()` detect the cluster; for a cluster jax does not detect, and for tests on one machine,
`--coordinator_address HOST:PORT --num_processes N --process_id I` on every process. A peer that stops sending
heartbeats for `--heartbeat_timeout_seconds` makes every other process fail with jax's message naming the lost task
("The following tasks are unhealthy (stopped sending heartbeats): 1"), instead of hanging in a collective.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags

log = logging.getLogger("mcpf_jax")

DISTRIBUTED = flags.DEFINE_bool("distributed", False, "multi-host: jax.distributed.initialize() with the cluster "
                                "auto-detected (TPU pods, SLURM, Open MPI, ...)")
COORDINATOR = flags.DEFINE_string("coordinator_address", None, "multi-host without auto-detection: HOST:PORT of "
                                  "process 0's coordinator (give --num_processes and --process_id too)")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-host: the number of processes")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-host: this process's index, 0..num_processes-1")
HEARTBEAT_TIMEOUT = flags.DEFINE_integer("heartbeat_timeout_seconds", 100, "multi-host: a peer silent this long is "
                                         "declared dead and every process fails, naming it")
SHUTDOWN_TIMEOUT = flags.DEFINE_integer("shutdown_timeout_seconds", 300, "multi-host: how long a finished process "
                                        "waits for the others at exit")
INIT_TIMEOUT = flags.DEFINE_integer("initialization_timeout_seconds", 300, "multi-host: how long to wait for all "
                                    "processes to connect at start")



# --help of train.py / eval.py. absl's help flags exit 1, list only the flags the main module defines (not these
# launch flags), and head them with sys.argv[0], a file path. These replace them: exit 0; --help lists the
# command's key flags (a command adopts this module's with `flags.adopt_module_key_flags(launch)`), --helpfull
# every flag; the command's heading is its name.


def _usage(full: bool) -> None:
  text = flags.FLAGS.get_help() if full else flags.FLAGS.main_module_help()
  text = text.replace(f"\n{sys.argv[0]}:\n", f"\n{os.path.basename(sys.argv[0])}:\n")
  more = "" if full else "\nTry --helpfull for every flag (absl's, e.g. --verbosity, and the libraries').\n"
  sys.stdout.write(f"{(sys.modules['__main__'].__doc__ or '').rstrip()}\n\nflags:\n{text}\n{more}")
  sys.stdout.flush()


class _Help(app.HelpFlag):
  """-?, --help: the command's flags."""

  def parse(self, arg):
    if self._parse(arg):
      _usage(full=False)
      sys.exit(0)


class _HelpShort(_Help):
  """--helpshort: as --help."""
  NAME, SHORT_NAME = "helpshort", None


class _HelpFull(app.HelpfullFlag):
  """--helpfull: every flag."""

  def parse(self, arg):
    if self._parse(arg):
      _usage(full=True)
      sys.exit(0)


app.define_help_flags()  # absl's (app.run() would define them), replaced; still listed under absl.app
for _flag in (_Help(), _HelpShort(), _HelpFull()):
  for _name in {_flag.name, _flag.short_name} - {None}:
    delattr(flags.FLAGS, _name)
  flags.DEFINE_flag(_flag, module_name="absl.app")


def initialize() -> bool:
  """Calls jax.distributed.initialize() as the flags ask; True when this is a multi-process job.

  Raises:
    ValueError: an incomplete explicit launch (--coordinator_address without --num_processes / --process_id).
  """
  explicit = [COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value]
  if not DISTRIBUTED.value and all(v is None for v in explicit):
    return False
  if any(v is not None for v in explicit) and any(v is None for v in explicit):
    raise ValueError("--coordinator_address, --num_processes and --process_id go together (got "
                     f"{COORDINATOR.value!r}, {NUM_PROCESSES.value!r}, {PROCESS_ID.value!r})")
  if NUM_PROCESSES.value is not None and not 0 <= PROCESS_ID.value < NUM_PROCESSES.value:
    raise ValueError(f"--process_id={PROCESS_ID.value} must be in 0..{NUM_PROCESSES.value - 1}")
  import jax  # pylint: disable=g-import-not-at-top
  jax.distributed.initialize(coordinator_address=COORDINATOR.value, num_processes=NUM_PROCESSES.value,
                             process_id=PROCESS_ID.value, initialization_timeout=INIT_TIMEOUT.value,
                             heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT.value,
                             shutdown_timeout_seconds=SHUTDOWN_TIMEOUT.value)
  return True


def is_distributed() -> bool:
  """True when jax.distributed was initialized in this process (its preemption sync point is then available)."""
  import jax  # pylint: disable=g-import-not-at-top
  return bool(jax.distributed.is_initialized())


def topology(mesh) -> str:
  """The one-line topology every process logs: processes, local and global devices, the mesh."""
  import jax  # pylint: disable=g-import-not-at-top
  d = jax.local_devices()[0]
  return (f"process {jax.process_index()} of {jax.process_count()} processes: {jax.local_device_count()} local / "
          f"{jax.device_count()} global devices ({d.platform} {getattr(d, 'device_kind', '')}), mesh data="
          f"{mesh.shape['data']} x model={mesh.shape['model']}")
