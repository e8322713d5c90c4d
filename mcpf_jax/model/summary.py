"""Parameter counts of a config's model, without loading any weights.

  python -m mcpf_jax.model.summary --config configs/base.py      # ViT-B/16, the default MCPF model

Prints one line per top-level parameter group (trainable or frozen under `model.trainable`) and a JSON total.
The CLIP sizes come from the preset / hub id named by `clip.name` (or a local folder's config.json).
"""

from __future__ import annotations

import json

from absl import app, logging
from ml_collections import config_flags

from mcpf_jax import model as iqa
from mcpf_jax.clip import config as clip_config
from mcpf_jax.model import freeze

_CONFIG = config_flags.DEFINE_config_file("config", "configs/base.py", "config file")


def count(config) -> dict[str, object]:
  """{"groups": {name: (count, trainable?)}, "trainable": n, "frozen": n, "fraction": trainable / frozen}."""
  cc = clip_config.from_name(config.clip.name)  # a preset, a hub id or a folder; no weights read
  shapes = iqa.abstract_params(iqa.module(config.model, cc))
  mask = freeze.mask(shapes, config.model.trainable)
  groups = {k: (freeze.count(v), freeze.count(v, mask[k]) > 0) for k, v in shapes.items()}
  trainable, frozen = freeze.count(shapes, mask), freeze.count(shapes, mask, freeze.FROZEN)
  return {"groups": groups, "trainable": trainable, "frozen": frozen,
          "fraction": trainable / max(frozen, 1)}


def main(argv):
  del argv
  # A report, not a job: absl's INFO default would let through jax's backend probing ("Unable to initialize
  # backend 'tpu'", on every machine without one). Warnings and errors still show.
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  out = count(config)
  print(f"{config.model.name} on {config.clip.name}")
  for name, (n, trains) in sorted(out["groups"].items()):
    print(f"  {name:28s} {n:>13,d}  {'trainable' if trains else 'frozen'}")
  print(json.dumps({"model": config.model.name, "clip": config.clip.name, "trainable": out["trainable"],
                    "frozen": out["frozen"], "trainable_fraction": round(out["fraction"], 5)}))


if __name__ == "__main__":
  app.run(main)
