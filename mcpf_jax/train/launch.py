"""Starting train.py / eval.py on one or many hosts: the launch flags, jax.distributed, the topology line.

With no launch flag, a cluster environment is detected by jax's own registry (`jax._src.clusters`: a Cloud TPU pod
on GCE or GKE, a SLURM job step, Open MPI, Kubernetes with the `jax[k8s]` extra), one line names it, and when it
holds more than one process jax.distributed.initialize() is called with no arguments (jax reads the coordinator,
the process count and this process's index from the environment). `--distributed` always initializes (jax
detects); `--nodistributed` never does. `--coordinator_address HOST:PORT --num_processes N --process_id I` on every
process win over detection (a cluster jax does not detect; the tests on one machine).

A start that would train alone while its scheduler started, or asked for, several tasks is refused with a
`LaunchError` before anything is written (train.py / eval.py exit 2): `--nodistributed` under `srun -n 2`, or an
sbatch / salloc script that runs python itself (SLURM_NTASKS=2 but no job step: only one task runs; `srun python
...` starts them), or an MPI launch jax does not detect. Each process would otherwise train alone on one workdir.

A peer that stops sending heartbeats for `--heartbeat_timeout_seconds` makes every other process fail with jax's
message naming the lost task ("The following tasks are unhealthy (stopped sending heartbeats): 1"), instead of
hanging in a collective.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags

log = logging.getLogger("mcpf_jax")

DISTRIBUTED = flags.DEFINE_bool("distributed", None, "multi-host: unset (the default) = jax.distributed starts when "
                                "a cluster of several processes is detected (TPU pod, SLURM step, Open MPI, "
                                "Kubernetes with jax[k8s]); --distributed = always, jax detects the cluster; "
                                "--nodistributed = never (refused where the scheduler started several tasks)")
COORDINATOR = flags.DEFINE_string("coordinator_address", None, "multi-host without detection: HOST:PORT of "
                                  "process 0's coordinator (give --num_processes and --process_id too); wins over "
                                  "detection")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-host without detection: the number of processes")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-host without detection: this process's index, "
                                  "0..num_processes-1")
HEARTBEAT_TIMEOUT = flags.DEFINE_integer("heartbeat_timeout_seconds", 100, "multi-host: a peer silent this long is "
                                         "declared dead and every process fails, naming it")
SHUTDOWN_TIMEOUT = flags.DEFINE_integer("shutdown_timeout_seconds", 300, "multi-host: how long a finished process "
                                        "waits for the others at exit")
INIT_TIMEOUT = flags.DEFINE_integer("initialization_timeout_seconds", 300, "multi-host: how long to wait for all "
                                    "processes to connect at start")


class LaunchError(ValueError):
  """A start that cannot form the job the launch flags or the scheduler describe; raised before anything is written.
  train.py / eval.py print it and exit 2."""


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


# jax's cluster environments (jax._src.clusters, jax 0.10): what to call each, and where its process count is read.
_CLUSTERS = {
    "SlurmCluster": ("SLURM job step", "SLURM_NTASKS"),
    "OmpiCluster": ("Open MPI", "OMPI_COMM_WORLD_SIZE"),
    "GceTpuCluster": ("Cloud TPU pod (GCE)", "the TPU VM metadata (worker-network-endpoints)"),
    "GkeTpuCluster": ("Cloud TPU slice on GKE", "TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES"),
    "K8sCluster": ("Kubernetes Job", "the Job's parallelism"),
}
# Task counts of launches that jax's registry does not take for a job, with the fix: a SLURM batch script or salloc
# shell (jax reads a job step's SLURM_STEP_NODELIST: without `srun` only this one task runs), an Open MPI launch
# without OMPI_MCA_orte_hnp_uri (what jax's detection reads), MPICH / Intel MPI (PMI).
_UNDETECTED = (
    ("SLURM_NTASKS", "SLURM", "no job step runs this process (no SLURM_STEP_NODELIST): an sbatch / salloc script "
     "that runs python itself starts one task, not SLURM_NTASKS. Start every task with `srun python ...` (in the "
     "sbatch file too), or ask for one task (`#SBATCH --ntasks=1`)"),
    ("OMPI_COMM_WORLD_SIZE", "Open MPI", "jax's Open MPI detection reads OMPI_MCA_orte_hnp_uri, which this launch "
     "did not set. Pass --coordinator_address HOST:PORT (rank 0's host) --num_processes=$OMPI_COMM_WORLD_SIZE "
     "--process_id=$OMPI_COMM_WORLD_RANK"),
    ("PMI_SIZE", "an MPI launcher (PMI)", "jax does not detect this launcher. Pass --coordinator_address HOST:PORT "
     "(rank 0's host) --num_processes=$PMI_SIZE --process_id=$PMI_RANK"),
)


def detect_cluster():
  """The cluster environment jax.distributed.initialize() would use with no arguments, or None: the first class of
  jax's registry (in jax's order, opt-in-only ones left out) whose `is_env_present()` is True."""
  from jax._src import clusters  # pylint: disable=g-import-not-at-top
  return next((env for env in clusters.ClusterEnv._cluster_types  # pylint: disable=protected-access
               if not env.opt_in_only_method and env.is_env_present()), None)


def cluster_name(env) -> str:
  return _CLUSTERS.get(env.__name__, (env.__name__,))[0]


def _count_source(env) -> str:
  """Where `env` reads its process count, with the variable's value when it is one."""
  source = _CLUSTERS.get(env.__name__, (None, "its environment"))[1]
  return f"{source}={os.environ[source]}" if source in os.environ else source


def _undetected_tasks() -> tuple[int, str, str]:
  """(tasks, what says so, the fix) from a launcher's task count that jax's registry does not detect; (1, "", "")
  when there is none."""
  for var, who, fix in _UNDETECTED:
    value = os.environ.get(var, "")
    if value.isdigit() and int(value) > 1:
      return int(value), f"{who} ({var}={value})", fix
  return 1, "", ""


def initialize() -> bool:
  """Starts jax.distributed as the flags and the detected cluster ask; True when this is a multi-process job.

  Raises:
    LaunchError: an incomplete explicit launch (--coordinator_address without --num_processes / --process_id), or
      a start that would leave this process alone while the scheduler started (or asked for) several tasks.
  """
  explicit = [COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value]
  if any(v is not None for v in explicit) and any(v is None for v in explicit):
    raise LaunchError("--coordinator_address, --num_processes and --process_id go together (got "
                      f"{COORDINATOR.value!r}, {NUM_PROCESSES.value!r}, {PROCESS_ID.value!r})")
  if NUM_PROCESSES.value is not None and not 0 <= PROCESS_ID.value < NUM_PROCESSES.value:
    raise LaunchError(f"--process_id={PROCESS_ID.value} must be in 0..{NUM_PROCESSES.value - 1}")
  # Explicit flags win: no detection (a cluster API that detection would query may be unreachable or forbidden).
  env = detect_cluster() if NUM_PROCESSES.value is None else None
  if env is not None:
    tasks = env.get_process_count()
    who = f"{cluster_name(env)} ({_count_source(env)})"
    log.info("cluster environment: %s, detected by jax (%s): %d process%s", who, env.__name__, tasks,
             "" if tasks == 1 else "es")
  elif NUM_PROCESSES.value is None:
    tasks, who, fix = _undetected_tasks()
  if NUM_PROCESSES.value is not None:
    tasks, processes = NUM_PROCESSES.value, NUM_PROCESSES.value
  elif DISTRIBUTED.value is False:
    processes, how = 1, "--nodistributed"
  elif env is not None and (tasks > 1 or DISTRIBUTED.value):
    processes, how = tasks, ""
  elif DISTRIBUTED.value:
    raise LaunchError("--distributed: jax detects no cluster environment here (a TPU pod, a SLURM job step, Open "
                      "MPI, Kubernetes with jax[k8s]); on a cluster it does not detect, pass --coordinator_address "
                      "HOST:PORT --num_processes N --process_id I to every process; for one process, leave "
                      "--distributed out")
  else:
    processes, how = 1, "no launch flag, and no cluster environment that jax detects"
  if tasks > 1 and processes == 1:
    if env is not None:
      fix = f"leave out {how} (jax.distributed then forms one job of the {tasks} tasks), or start one task"
    raise LaunchError(f"{who} says this job has {tasks} tasks, but this process would run alone ({how}): each task "
                      f"would train by itself on the same workdir. Fix: {fix}")
  if processes == 1 and NUM_PROCESSES.value is None and not DISTRIBUTED.value:
    return False
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
