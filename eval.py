"""Evaluate a trained checkpoint: `python eval.py --config configs/livec.py --workdir runs/livec`.

Writes <workdir>/eval.json (srcc, plcc, plcc after the 4-parameter logistic fit, krcc, rmse, num_images),
<workdir>/eval_predictions.csv (name, mos, score) and <workdir>/eval_scatter.png. `--checkpoint best|latest|STEP`;
`--dataset NAME` evaluates on another (built) dataset, all of it (cross-dataset). orbax's INFO lines are hidden
unless --verbosity is given.
"""

import json

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "the config the run was trained with", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "the training run's workdir")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "best | latest | a step (default: config.eval.checkpoint)")
_DATASET = flags.DEFINE_string("dataset", None, "evaluate on another dataset (default: the test split)")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "multi-host: call jax.distributed.initialize() first")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from mcpf_jax.train import logs  # pylint: disable=g-import-not-at-top
  logs.start_program(_DISTRIBUTED.value)  # logging (orbax's INFO lines only with --verbosity), multi-host start
  from mcpf_jax.train import trainer  # pylint: disable=g-import-not-at-top
  result = trainer.evaluate(_CONFIG.value, _WORKDIR.value, checkpoint=_CHECKPOINT.value, dataset=_DATASET.value)
  print(json.dumps({k: result[k] for k in ("dataset", "split", "checkpoint_step", "srcc", "plcc", "plcc_logistic",
                                           "krcc", "rmse", "num_images")}))


if __name__ == "__main__":
  app.run(main)
