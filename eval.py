"""Evaluate a trained checkpoint: `python eval.py --workdir runs/livec` (or with `--config configs/livec.py`).

The model, backbone, split, preprocessing and score mapping are the run's own (<workdir>/run.json, split.json):
`--workdir runs/livec/split_3` evaluates exactly split 3's test images. `--config` is optional; only its eval.*
fields (and where the data and backbone live, and the mesh) are used, and a `--config.x=y` that asks for another
model, split or preprocessing than the run's is refused.

Writes <workdir>/eval.json (srcc, plcc, plcc after the 4-parameter logistic fit, krcc, rmse, num_images),
<workdir>/eval_predictions.csv (name, mos, score) and <workdir>/eval_scatter.png. `--checkpoint best|latest|STEP`;
`--dataset NAME` evaluates on another (built) dataset, all of it (cross-dataset). orbax's INFO lines are hidden
unless --verbosity is given.
"""

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from mcpf_jax import rundir, runs
from mcpf_jax.train import launch

flags.adopt_module_key_flags(launch)  # the multi-host launch flags, listed by --help

_CONFIG = config_flags.DEFINE_config_file("config", None, "optional: a config file; only its eval.* fields are used",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "the training run's workdir: " + rundir.WHERE)
flags.register_validator("workdir", lambda v: v is None or rundir.supported(v), f"expected {rundir.WHERE}")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "best | latest | a step (default: config.eval.checkpoint)")
_DATASET = flags.DEFINE_string("dataset", None,
                                "evaluate on another dataset, all of it (default: the test part of the run's split)")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  from mcpf_jax.train import logs  # pylint: disable=g-import-not-at-top
  try:
    logs.start_program()  # logging (orbax's INFO lines only with --verbosity), multi-host start (launch flags)
  except launch.LaunchError as e:  # refused before anything is written
    print(f"eval.py: {e}", file=sys.stderr)
    sys.exit(2)
  from mcpf_jax.train import evaluation, hosts, identity, preemption  # pylint: disable=g-import-not-at-top
  explicit = config_flags.get_override_values(flags.FLAGS["config"]) if _CONFIG.value is not None else {}
  try:
    result = evaluation.evaluate(_CONFIG.value, _WORKDIR.value, checkpoint=_CHECKPOINT.value, dataset=_DATASET.value,
                              explicit=explicit)
  except (identity.RunMismatchError, runs.DamagedCheckpointError, hosts.HostsError) as e:  # refused / a damaged step
    sys.exit(f"eval.py: {e}")
  except preemption.Stopped as e:  # SIGTERM / SIGINT: nothing written
    print(f"eval.py: {e}", file=sys.stderr)
    sys.exit(e.status)
  print(json.dumps({k: result[k] for k in ("dataset", "part", "checkpoint_step", "srcc", "plcc", "plcc_logistic",
                                           "krcc", "rmse", "num_images")}))


if __name__ == "__main__":
  app.run(main)
