"""Performance changes compute the same numbers: each fast path against the plain computation it replaces.

(Parity with independent implementations is in test_clip_model.py and test_model.py; these check that a shortcut
taken for speed, e.g. dropping the text positions after end-of-text, is exact.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcpf_jax import clip
from mcpf_jax import model as iqa
from mcpf_jax.clip.model import end_of_text_span
from mcpf_jax.clip.tiny import write_tiny_clip

IMAGE = 32
SMALL = dict(width=32, layers=3, heads=4, image_size=IMAGE, patch_size=8, embed_dim=24)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
  return clip.load(write_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=5, **SMALL))


def test_end_of_text_span_follows_the_pooling_rule():
  text = clip.CLIPTextConfig()
  ids = np.full((3, 77), text.eos_token_id)  # padded with end-of-text, as the CLIP tokenizer does
  ids[:, 0] = text.bos_token_id
  ids[0, 1:4], ids[1, 1:9], ids[2, 1:2] = 5, 6, 7  # end-of-text at 4, 9 and 2
  assert end_of_text_span(ids, text) == 10
  legacy = clip.CLIPTextConfig(eos_token_id=2)  # pools at argmax(ids): the largest id
  zero_padded = np.where(np.arange(77) > np.array([[4], [9], [2]]), 0, ids)
  assert end_of_text_span(zero_padded, legacy) == 10
  no_eos = ids.copy()
  no_eos[1] = 5  # a row without end-of-text: nothing is dropped
  assert end_of_text_span(no_eos, text) == 77


@pytest.mark.parametrize("name", ["mcpf", "mpiqe"])
def test_class_features_same_as_full_length(bundle, name):
  """Class features from the end-of-text span equal those from all 77 positions, deep prompts included."""
  config = dict(name=name, prompt_depth=2, num_text_prompts=4, num_vision_prompts=4, fusion_width=16,
                fusion_heads=2, query_heads=2)
  model, params = iqa.build(config, bundle, jax.random.key(1))
  assert model.text_span < 77

  def both(m):
    text_prompts, _ = m.prompts()
    short = m.encode_classes(text_prompts)
    full = {}
    for label_set, rows in m.text_ids:  # each set with its own prompts (mpiqe) or the shared ones (mcpf)
      prompts = text_prompts["all"] if "all" in text_prompts else text_prompts[label_set]
      f = m.clip.encode_text(jnp.asarray(np.asarray(rows, np.int32)), prompts)
      assert f.shape[0] == len(rows) and np.asarray(rows).shape[1] == 77
      full[label_set] = f / jnp.linalg.norm(f, axis=-1, keepdims=True)
    return short, full

  short, full = model.apply({"params": params}, method=both)
  for label_set in full:
    np.testing.assert_allclose(np.asarray(short[label_set]), np.asarray(full[label_set]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("remat", [False, True])
def test_cls_only_last_block_same_features(bundle, remat):
  """encode_image without tokens (the last block updates only CLS) equals the full last block's CLS, prompts on."""
  config = bundle.config.replace(remat=remat)
  model = clip.CLIP(config)
  rng = np.random.default_rng(0)
  pixels = jnp.asarray(rng.standard_normal((2, IMAGE, IMAGE, 3)), jnp.float32)
  prompts = [jnp.asarray(rng.standard_normal((3, config.vision.hidden_size)) * 0.1, jnp.float32)] * 2

  def features(p, return_tokens):
    out = model.apply({"params": bundle.params}, pixels, p, return_tokens=return_tokens, method="encode_image")
    return out[0] if return_tokens else out

  fast, full = features(prompts, False), features(prompts, True)
  np.testing.assert_allclose(np.asarray(fast), np.asarray(full), rtol=1e-5, atol=1e-6)
  # Gradients with respect to the prompts (what training differentiates) agree too.
  loss = lambda p, t: jnp.sum(jnp.sin(features(p, t)))
  g_fast, g_full = jax.grad(loss)(prompts, False), jax.grad(loss)(prompts, True)
  for a, b in zip(g_fast, g_full):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_per_head_attention_matches_jax(causal, dtype):
  """The per-head attention of the towers against jax.nn.dot_product_attention: values and gradients."""
  from mcpf_jax.clip.layers import _attention  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 7, 3, 8)), dtype) for _ in range(3))
  ours = _attention(q, k, v, causal)
  ref = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
  assert ours.dtype == ref.dtype
  tol = 1e-6 if dtype == "float32" else 2e-2
  np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32), rtol=tol, atol=tol)
  if dtype == "float32":
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
    g_ours = jax.grad(loss(lambda *a: _attention(*a, causal)), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(loss(lambda *a: jax.nn.dot_product_attention(*a, is_causal=causal)), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_ours, g_ref):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n, chunk", [(6, 3), (7, 4), (5, None)])
def test_chunked_image_encoding_same_as_whole_batch(bundle, n, chunk):
  """CLIPConfig.image_chunk encodes a batch chunk by chunk (padding the last one) with the whole batch's numbers."""
  from mcpf_jax.clip.tuning import chunking  # pylint: disable=g-import-not-at-top
  assert chunking(32, 8) == (8, 32) and chunking(30, 8) == (6, 30) and chunking(13, 8) == (7, 14)
  assert chunking(13, 0) == (13, 13) and chunking(5, 8) == (5, 5)
  cpu = jax.default_backend() == "cpu"
  assert chunking(32, None, 768) == ((8, 32) if cpu else (32, 32)) and chunking(32, None, 64) == (32, 32)
  config = bundle.config
  rng = np.random.default_rng(3)
  pixels = jnp.asarray(rng.standard_normal((n, IMAGE, IMAGE, 3)), jnp.float32)
  width = config.vision.hidden_size
  shared = jnp.asarray(rng.standard_normal((2, width)) * 0.1, jnp.float32)
  per_image = jnp.asarray(rng.standard_normal((n, 2, width)) * 0.1, jnp.float32)  # one prompt set per image
  prompts = [shared, per_image]

  def encode(image_chunk, p, return_tokens=False):
    return clip.CLIP(config.replace(image_chunk=image_chunk)).apply({"params": bundle.params}, pixels, p,
                                                             return_tokens=return_tokens, method="encode_image")

  whole = encode(0, prompts, True)
  chunked = encode(chunk, prompts, True)
  for a, b in zip(chunked, whole):  # float rounding only: 1e-5 of the largest value (as test_clip_model)
    assert a.shape == b.shape
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(b))))
  loss = lambda c: lambda p: jnp.sum(jnp.sin(encode(c, p)))
  for a, b in zip(jax.grad(loss(chunk))(prompts), jax.grad(loss(0))(prompts)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
