"""Train an IQA model: `python train.py --config configs/livec.py --workdir runs/livec`.

Starting again with the same --workdir resumes from its latest checkpoint, with the same config: a restart that
changes what is computed (model, data, split, loss, optimizer, batch, seed, ...) is refused, naming each field; the
fields that may change are listed in the README. `--config.init_from=runs/koniq` starts a NEW run from another run's
trained weights. `--config.num_splits=10` runs the papers' 10-split protocol (each split in <workdir>/split_<s>) and
writes <workdir>/protocol.json. Any config field is set with --config.FIELD=VALUE (e.g. --config.train.batch_size=64).
On several hosts start the same command on every host: a TPU pod, a SLURM step (`srun`), Open MPI or a Kubernetes
Job is detected and jax.distributed started (--nodistributed: never; elsewhere --coordinator_address HOST:PORT
--num_processes N --process_id I); a start that would run alone where the scheduler has several tasks exits 2.
SIGTERM / SIGINT, or a GCE / TPU VM maintenance event (TERMINATE_ON_HOST_MAINTENANCE on the metadata server): the
run finishes its step, saves it and exits with status 143 (SIGTERM, a maintenance event; any stop under
jax.distributed) or 130 (SIGINT); the same command resumes.
One train.py writes a run at a time (<workdir>/train.lock; --force_unlock); a damaged checkpoint step is moved
to <checkpoint_dir>.damaged/ and the run resumes from the previous one. orbax's INFO lines (dozens per checkpoint)
are hidden unless --verbosity is given (e.g. --verbosity=0).
"""

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from mcpf_jax import rundir, runs
from mcpf_jax.train import launch

flags.adopt_module_key_flags(launch)  # the multi-host launch flags, listed by --help

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file (configs/*.py)", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, logs and results go: " + rundir.WHERE)
_FORCE_UNLOCK = flags.DEFINE_bool("force_unlock", False, "take the run's lock (<workdir>/train.lock) even if another "
                                  "host's train.py holds it: only when that one is known to be gone")
flags.mark_flags_as_required(["config", "workdir"])
flags.register_validator("workdir", lambda v: v is None or rundir.supported(v), f"expected {rundir.WHERE}")


def main(argv):
  del argv
  from mcpf_jax.train import logs  # pylint: disable=g-import-not-at-top
  try:
    logs.start_program()  # logging (orbax's INFO lines only with --verbosity), multi-host start (launch flags)
  except launch.LaunchError as e:  # refused before anything is written
    print(f"train.py: {e}", file=sys.stderr)
    sys.exit(2)
  import jax  # pylint: disable=g-import-not-at-top

  from mcpf_jax.train import checkpoints, hosts, identity, preemption, protocol, runlock, trainer  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  if not rundir.supported(config.get("checkpoint_dir") or ""):
    sys.exit(f"train.py: checkpoint_dir={config.checkpoint_dir!r}: expected {rundir.WHERE}")
  try:
    # One writer per run: process 0 holds <workdir>/train.lock until train.py ends, whichever way it ends.
    with runlock.hold(_WORKDIR.value, force=_FORCE_UNLOCK.value, enabled=jax.process_index() == 0):
      _train(config, protocol, trainer)
  except runlock.RunLockedError as e:  # another train.py writes this run: nothing was changed
    sys.exit(f"train.py: {e}")
  except (identity.RunMismatchError, hosts.HostsError) as e:  # a refused restart: nothing in the workdir was changed
    sys.exit(f"train.py: {e}")
  except runs.DamagedCheckpointError as e:  # no checkpoint step of the run reads (each is named)
    sys.exit(f"train.py: {e}")
  except checkpoints.CheckpointSaveError as e:  # no space, no permission: one line (the traceback: debug log)
    print(f"train.py: {e}", file=sys.stderr, flush=True)
    # orbax's abandoned background writes are collected at interpreter exit, each printing "Exception ignored"
    # tracebacks after the line that matters: the rest of this process's stderr goes nowhere.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stderr.fileno())
    sys.exit(1)
  except preemption.Stopped as e:  # SIGTERM / SIGINT: the step reached is saved; the same command resumes
    print(f"train.py: {e}", file=sys.stderr)
    sys.exit(e.status)


def _train(config, protocol, trainer):
  if config.num_splits > 1:
    out = protocol.train_splits(config, _WORKDIR.value)
    print(json.dumps({"num_splits": out["num_splits"], "srcc_median": out["summary"]["srcc"]["median"],
                      "plcc_median": out["summary"]["plcc"]["median"]}))
  else:
    summary = trainer.train_and_evaluate(config, _WORKDIR.value)
    t = summary["test"]
    print(json.dumps({"dataset": t["dataset"], "step": summary["step"], "test_srcc": t["srcc"],
                      "test_plcc": t["plcc"], "num_images": t["num_images"], "devices": summary["devices"]}))


if __name__ == "__main__":
  app.run(main)
