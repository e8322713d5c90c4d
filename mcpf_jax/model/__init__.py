"""The IQA model on top of CLIP: prompts, routing, heads and variants (iqa.py), cross-modal prompt fusion (fusion.py),
losses (losses.py), which parameters train (freeze.py), analytic FLOPs (flops.py), parameter counts (summary.py)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mcpf_jax.model import losses
from mcpf_jax.model.iqa import IQAModel, ModelSpec, class_token_ids

__all__ = ["IQAModel", "ModelSpec", "abstract_params", "build", "class_token_ids", "losses", "module"]


def module(model_config, clip_config, tokenizer=None) -> IQAModel:
  """The IQA model of `model_config` on a CLIP of `clip_config`: the one place an IQAModel is made (training,
  scoring, the pre-flight and the parameter counts all come here).

  `tokenizer`: the backbone's, for the class prompts' token ids. None gives placeholder ids of the same shape, for
  what needs the parameter shapes only (they do not depend on the ids).
  """
  spec = ModelSpec.from_config(model_config, num_layers=min(clip_config.text.num_hidden_layers,
                                                            clip_config.vision.num_hidden_layers))
  if tokenizer is None:
    ids = tuple((s, ((0,) * clip_config.text.max_position_embeddings,) * len(spec.class_phrases(s)))
                for s in spec.class_sets)
  else:
    ids = tuple((k, tuple(tuple(int(t) for t in row) for row in v))
                for k, v in class_token_ids(spec, tokenizer).items())
  return IQAModel(clip_config, spec, ids)


def abstract_params(model: IQAModel) -> dict[str, Any]:
  """The shapes of `model`'s parameters (`jax.ShapeDtypeStruct`s, float32 as initialised); nothing is computed."""
  size = model.clip_config.vision.image_size
  return jax.eval_shape(model.init, jax.random.key(0),
                        jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))["params"]


def build(model_config, bundle, rng: jax.Array) -> tuple[IQAModel, dict[str, Any]]:
  """Builds the IQA model around a loaded CLIP `bundle` (mcpf_jax.clip.load) and initialises its parameters.

  The CLIP parameters are the pretrained ones (`bundle.params`, not re-initialised); the layer-0 text prompts
  start from the token embeddings of `model.text_prompt_init` (e.g. "a photo of a": its tokens fill the first
  positions, any remaining ones keep their N(0, 0.02) draw); everything else is drawn from `rng`.

  Returns:
    (model, params) with params = {"clip": ..., "text_prompts_*": ..., "vision_prompts": ..., "fusion": ...}.
  """
  if bundle.tokenizer is None:
    raise ValueError(f"{bundle.source}: the backbone came without a usable tokenizer, which the class prompts need "
                     "(CLIP: tokenizer.json or vocab.json + merges.txt; SigLIP 2: Gemma's tokenizer.json; SigLIP 1's "
                     "SentencePiece spiece.model is not supported)")
  model = module(model_config, bundle.config, bundle.tokenizer)
  spec, size = model.spec, bundle.config.vision.image_size
  shapes = abstract_params(model)
  # Initialise only what is new: the CLIP subtree comes from the checkpoint. Dropping it from the jitted output
  # lets XLA remove its 150M-parameter random draw (and the init forward pass) entirely.
  init_new = lambda r: {k: v for k, v in model.init(r, jnp.zeros((1, size, size, 3)))["params"].items()
                        if k != "clip"}
  params = dict(jax.jit(init_new)(rng))
  # Shapes must match; the dtype may be the model's float32 or the bundle's storage dtype (clip.param_dtype).
  expected = jax.tree.map(lambda s: s.shape, shapes["clip"])
  got = jax.tree.map(lambda a: a.shape, bundle.params)
  if jax.tree.structure(expected) != jax.tree.structure(got) or expected != got:
    raise ValueError("CLIP parameters of the checkpoint do not match the model built from its config")
  params["clip"] = bundle.params
  if spec.text_depth > 0 and spec.text_prompt_init:
    phrase = bundle.tokenizer.encode(spec.text_prompt_init)
    if len(phrase) > spec.num_text_prompts:
      raise ValueError(f"model.text_prompt_init={spec.text_prompt_init!r} is {len(phrase)} tokens, more than "
                       f"model.num_text_prompts={spec.num_text_prompts}")
    table = bundle.params["text_model"]["embeddings"]["token_embedding"]["embedding"]
    emb = jnp.asarray(np.asarray(table, np.float32)[np.asarray(phrase)])
    for name in [k for k in params if k.startswith("text_prompts_")]:
      params[name] = params[name].at[0, :len(phrase)].set(emb)
  return model, params
