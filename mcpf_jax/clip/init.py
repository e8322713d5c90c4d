"""Parameter trees without a checkpoint: the shapes of a config's tree and a random draw of it.

`init_random` gives the weights of `mcpf_jax.clip.model.CLIP` as transformers initialises them (for tests, tiny
models and benchmarks); `param_shapes` is the layout that checkpoint loading checks files against.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mcpf_jax.clip.config import CLIPConfig
from mcpf_jax.clip.model import CLIP


def init_random(config: CLIPConfig, seed: int = 0) -> dict[str, Any]:
  """A random float32 parameter tree for `config` (the `params` collection, HF Flax layout).

  Drawn in numpy with transformers' CLIP initialisation (`CLIPPreTrainedModel._init_weights`, factor 1):
  no XLA compile, so a tiny model for tests or the smoke run is instant. LayerNorms start at (1, 0), biases
  at 0 and `logit_scale` at `config.logit_scale_init_value`.
  """
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(param_shapes(config))
  out = {}
  for path, spec in sorted(flat.items()):
    name, leaf = path[-2] if len(path) > 1 else "", path[-1]
    tower = config.text if path[0] == "text_model" else config.vision
    width, layers = tower.hidden_size, tower.num_hidden_layers
    if leaf == "logit_scale":
      value = np.full(spec.shape, config.logit_scale_init_value)
    elif leaf == "bias":
      value = np.zeros(spec.shape)
    elif leaf == "scale":
      value = np.ones(spec.shape)
    else:
      if leaf == "class_embedding":
        std = width ** -0.5
      elif leaf == "embedding" or name == "patch_embedding":
        std = 0.02
      elif name in ("q_proj", "k_proj", "v_proj", "fc2"):
        std = width ** -0.5 * (2 * layers) ** -0.5
      elif name == "out_proj":
        std = width ** -0.5
      elif name == "fc1":
        std = (2 * width) ** -0.5
      elif name in ("visual_projection", "text_projection"):
        std = spec.shape[0] ** -0.5
      else:
        raise AssertionError(f"no initialiser for {'/'.join(path)}")
      value = rng.standard_normal(spec.shape, dtype=np.float32) * np.float32(std)
    out[path] = jnp.asarray(value, jnp.float32)
  return traverse_util.unflatten_dict(out)


def param_shapes(config: CLIPConfig) -> dict[str, Any]:
  """The parameter tree of `config` as `jax.ShapeDtypeStruct`s, without computing anything."""
  model = CLIP(config)
  size = config.vision.image_size
  pixels = jax.ShapeDtypeStruct((1, size, size, config.vision.num_channels), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, config.text.max_position_embeddings), jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), pixels, ids)["params"]
