"""What the smoke run is made of, in one place: it runs offline, in minutes on a CPU (the README has its timing).

A plugin (configs/smoke.py: `plugins = ("mcpf_jax.smoke",)`): importing it registers the tiny CLIP as the generated
backbone clip.name="tiny" (`mcpf_jax.runs.register_backbone`) and the smoke data as the generated dataset
data.name="smoke" (`mcpf_jax.data.register_generated`); nothing outside this package names either.

  backbone.py  the tiny CLIP's sizes and seed, and its bundled pre-trained vision tower (assets/)
  pretrain.py  how that tower was made: dead-leaves images with the smoke distortions (`python -m` it to rebuild)
  data.py      the smoke dataset: scikit-image photos with blur / noise / JPEG at five known levels, as a CSV dataset

The generic pieces live where they belong: the tiny HF-format CLIP writer in mcpf_jax.clip.tiny, the CSV dataset
builder in mcpf_jax.data, the write-once of a generated backbone in mcpf_jax.runs.
"""

from mcpf_jax import config_schema, runs
from mcpf_jax import data as datasets
from mcpf_jax.smoke import backbone, data

config_schema.declare("clip.tiny", dict)  # the tiny CLIP's sizes (`backbone.recipe`; a ConfigDict in a config)
config_schema.declare("clip.tiny_seed", int)

runs.register_backbone("tiny", runs.GeneratedBackbone(recipe=backbone.recipe, write=backbone.write,
                                                      clip_config=backbone.clip_config))
datasets.register_generated("smoke", datasets.Generated(csv=data.CSV_CONFIG, write_release=data.write_smoke_release))
