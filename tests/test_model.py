"""The IQA model: variants, fusion, prompt-only training, losses (against numpy/scipy), zero-shot parity."""


import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy import special, stats

from mcpf_jax import clip
from mcpf_jax import model as iqa
from mcpf_jax.clip import preprocess
from mcpf_jax.clip.tiny import write_tiny_clip
from mcpf_jax.model import freeze, losses
from mcpf_jax.model.fusion import CrossAttentionFusion
from mcpf_jax.train import optim
from mcpf_jax.train import step as train_step_lib
from tests.batches import iqa_batch

IMAGE = 32
SMALL = dict(width=32, layers=3, heads=4, image_size=IMAGE, patch_size=8, embed_dim=24)
BASE_MODEL = dict(prompt_depth=2, num_text_prompts=4, num_vision_prompts=4, text_prompt_init="a photo of a",
                  fusion_width=16, fusion_heads=2, query_heads=2, aux=("scene", "distortion"))
OPTIM = dict(lr=1e-2, warmup_steps=0, total_steps=10, final_lr_fraction=0.0, weight_decay=0.0, b1=0.9,
             b2=0.999, grad_clip_norm=0.0)


class Cfg(dict):
  __getattr__ = dict.__getitem__


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
  return clip.load(write_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=3, **SMALL))


VARIANTS = {
    "mcpf": dict(name="mcpf"),
    "mcpf-linear": dict(name="mcpf", fusion="linear"),
    "mcpf-none": dict(name="mcpf", fusion="none"),
    "maple": dict(name="maple"),
    "coop": dict(name="coop"),
    "mpiqe": dict(name="mpiqe"),
    "mcpf-all": dict(name="mcpf", trainable="all"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_train_step_updates_only_trainable(bundle, variant):
  mc = {**BASE_MODEL, **VARIANTS[variant]}
  model, params = iqa.build(mc, bundle, jax.random.key(0))
  mask = freeze.mask(params, mc.get("trainable", "prompts"))
  tx = optim.make_optimizer(Cfg(OPTIM), mask)
  state = train_step_lib.init_state(params, tx)
  weights = {"rank": 1.0, "l1": 1.0, "cls": 0.5, "aux": 0.1}
  step = jax.jit(train_step_lib.make_train_step(model, mask, tx, weights))
  batch = iqa_batch(4, IMAGE, has_scene=[1, 1, 0, 1], has_distortion=[1, 0, 1, 1])
  before = jax.tree.map(np.asarray, params)
  new_state, metrics = step(state, batch)
  assert bool(metrics["finite"]) and np.isfinite(float(metrics["loss"]))

  trainable, frozen = optim.partition(before, mask)
  new_trainable, new_frozen = optim.partition(jax.tree.map(np.asarray, new_state["params"]), mask)
  # The frozen backbone is bitwise unchanged.
  for k in frozen:
    assert frozen[k].tobytes() == new_frozen[k].tobytes(), k
  if mc.get("trainable") == "all":
    assert not frozen
  else:
    assert frozen and all(k.startswith("clip/") for k in frozen)
    assert not any(k.startswith("clip/") for k in trainable)
  # Every trainable leaf has a non-zero gradient and moved.
  grad_fn = jax.jit(jax.grad(lambda tr: losses.batch_loss(
      model.apply({"params": optim.merge(tr, frozen)}, preprocess.normalize(batch["image"])), batch,
      weights)[0]))
  grads = grad_fn(trainable)
  for k, g in grads.items():
    assert np.any(np.asarray(g) != 0), f"zero gradient for {k}"
    assert np.any(new_trainable[k] != trainable[k]), f"{k} did not change"
  # No optimizer state for frozen weights: Adam's two moments of the trainable leaves and a few counters.
  opt_size = sum(int(np.size(x)) for x in jax.tree.leaves(new_state["opt"]))
  n_trainable = freeze.count(params, mask)
  assert opt_size <= 2 * n_trainable + 8


@pytest.mark.parametrize("variant", ["mcpf", "maple", "coop", "mpiqe", "mcpf-all", "clipiqa"])
def test_scanned_layers_give_the_same_scores_and_grads(bundle, variant):
  """clip.scan_layers: the same parameter tree, and outputs (scores, logits) within 1e-5 and gradients of every
  trainable leaf within float32 rounding of the unrolled towers', for every variant (mcpf's fusion options change
  no backbone call: mcpf stands for them)."""
  mc = {**BASE_MODEL, **VARIANTS[variant]} if variant in VARIANTS else {"name": variant}
  model, params = iqa.build(mc, bundle, jax.random.key(0))
  scanned, scanned_params = iqa.build(mc, bundle.with_compute(scan_layers=True), jax.random.key(0))
  assert jax.tree.structure(scanned_params) == jax.tree.structure(params)  # the same (HF) layout
  mask = freeze.mask(params, mc.get("trainable", "prompts"))
  weights = {"rank": 1.0, "l1": 1.0, "cls": 0.5, "aux": 0.1}
  batch = iqa_batch(4, IMAGE, seed=1)
  images = preprocess.normalize(batch["image"])

  # LLVM's optimisations off: ~3x faster compiles of these tiny graphs, the same computation.
  @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
  def both(params):
    trainable, frozen = optim.partition(params, mask)
    out = {}
    for name, m in (("unrolled", model), ("scanned", scanned)):
      loss = lambda tr, m=m: losses.batch_loss(m.apply({"params": optim.merge(tr, frozen)}, images), batch,
                                               weights)[0]
      out[name] = (m.apply({"params": params}, images), jax.grad(loss)(trainable) if trainable else {})
    return out

  out = jax.device_get(both(params))
  (ref, ref_grads), (got, got_grads) = out["unrolled"], out["scanned"]
  assert set(got) == set(ref) and "score" in ref
  for k in ref:
    scale = max(float(np.max(np.abs(ref[k]))), 1e-6)
    assert float(np.max(np.abs(got[k] - ref[k]))) / scale <= 1e-5, k
  assert set(got_grads) == set(ref_grads) == set(optim.partition(params, mask)[0])
  # Some gradients are zero but for rounding (a key bias under softmax): the tolerance is on the largest gradient.
  scale = max((float(np.max(np.abs(g))) for g in ref_grads.values()), default=0.0)
  for k in ref_grads:
    np.testing.assert_allclose(got_grads[k], ref_grads[k], rtol=1e-4, atol=1e-6 * scale, err_msg=k)


def test_clipiqa_has_nothing_to_train(bundle):
  model, params = iqa.build({"name": "clipiqa"}, bundle, jax.random.key(0))
  assert set(params) == {"clip"}
  out = model.apply({"params": params}, jnp.zeros((2, IMAGE, IMAGE, 3)))
  assert out["quality_logits"].shape == (2, 2)
  np.testing.assert_allclose(out["score01"], jax.nn.softmax(out["quality_logits"])[:, 1], rtol=1e-6)


def test_zero_depth_equals_transformers_zero_shot(bundle):
  """With prompts of depth 0 and no fusion, the quality logits are plain CLIP zero-shot logits."""
  torch = pytest.importorskip("torch")
  import transformers  # pylint: disable=g-import-not-at-top
  mc = {**BASE_MODEL, "name": "mcpf", "fusion": "none", "text_depth": 0, "vision_depth": 0}
  model, params = iqa.build(mc, bundle, jax.random.key(0))
  spec = model.spec
  ids = iqa.class_token_ids(spec, bundle.tokenizer)["quality"]
  pixels = np.random.default_rng(1).normal(size=(3, IMAGE, IMAGE, 3)).astype(np.float32)
  ours = np.asarray(model.apply({"params": params}, pixels)["quality_logits"])
  folder = bundle.source.rsplit("/", 1)[0]
  ref = transformers.CLIPModel.from_pretrained(folder).eval()
  with torch.no_grad():
    theirs = ref(input_ids=torch.from_numpy(ids.astype(np.int64)),
                 pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).logits_per_image.numpy()
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
  # The text the classes read: no placeholders without text prompts.
  assert bundle.tokenizer.encode("X")[0] not in ids


def test_prompt_init_from_phrase(bundle):
  _model, params = iqa.build({**BASE_MODEL, "name": "mcpf", "num_text_prompts": 6, "num_vision_prompts": 6},
                            bundle, jax.random.key(0))
  phrase = bundle.tokenizer.encode("a photo of a")
  assert len(phrase) == 4
  table = np.asarray(bundle.params["text_model"]["embeddings"]["token_embedding"]["embedding"])
  np.testing.assert_array_equal(np.asarray(params["text_prompts_all"][0, :len(phrase)]), table[phrase])
  # The remaining positions and the deeper layers are random draws, not copies.
  assert not np.allclose(np.asarray(params["text_prompts_all"][0, len(phrase):]), 0)


def test_config_errors(bundle):
  with pytest.raises(ValueError, match="model.name"):
    iqa.build({"name": "nope"}, bundle, jax.random.key(0))
  with pytest.raises(ValueError, match="num_vision_prompts"):
    iqa.build({**BASE_MODEL, "name": "maple", "num_vision_prompts": 3}, bundle, jax.random.key(0))
  with pytest.raises(ValueError, match="more than"):
    iqa.build({**BASE_MODEL, "num_text_prompts": 2}, bundle, jax.random.key(0))


def test_fusion_gradients_match_finite_differences():
  with jax.enable_x64(True):
    fusion = CrossAttentionFusion(width=8, num_heads=2, dtype=jnp.float64)
    rng = np.random.default_rng(0)
    text, vision = rng.normal(size=(3, 6)), rng.normal(size=(4, 10))
    params = fusion.init(jax.random.key(0), text, vision)["params"]
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
    def f(p, t, v):
      a, b = fusion.apply({"params": p}, t, v)
      return jnp.sum(jnp.sin(a)) + jnp.sum(jnp.cos(b) * v)
    check_grads(f, (params, text, vision), order=1, modes=("rev",), eps=1e-6, atol=1e-6, rtol=1e-6)


def _numpy_fidelity(s, m, std, w):
  n = len(s)
  total = count = 0.0
  for i in range(n):
    for j in range(n):
      if i == j or not (w[i] and w[j]):
        continue
      p_hat = stats.norm.cdf((s[i] - s[j]) / np.sqrt(2))
      if std is not None and std[i] > 0 and std[j] > 0:
        p = stats.norm.cdf((m[i] - m[j]) / np.sqrt(std[i] ** 2 + std[j] ** 2))
      else:
        p = 1.0 if m[i] > m[j] else (0.5 if m[i] == m[j] else 0.0)
      total += 1 - np.sqrt(p * p_hat + 1e-8) - np.sqrt((1 - p) * (1 - p_hat) + 1e-8)
      count += 1
  return total / count


def test_losses_match_numpy():
  s = np.array([1.2, 3.4, 2.2, 4.9, 2.2])
  m = np.array([0.1, 0.7, 0.4, 0.9, 0.4])
  std = np.array([0.1, np.nan, 0.2, 0.05, 0.3])
  w = np.array([1, 1, 1, 0, 1], np.float32)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  np.testing.assert_allclose(losses.fidelity_ranking(f32(s), f32(m), f32(std), f32(w)),
                             _numpy_fidelity(s, m, std, w), rtol=1e-5)
  np.testing.assert_allclose(losses.fidelity_ranking(f32(s), f32(m)), _numpy_fidelity(s, m, None, np.ones(5)),
                             rtol=1e-5)
  logits = np.random.default_rng(0).normal(size=(5, 4))
  y = np.array([0, 3, 2, 1, 1])
  ce = -special.log_softmax(logits, axis=1)[np.arange(5), y]
  np.testing.assert_allclose(losses.cross_entropy(f32(logits), jnp.asarray(y), f32(w)),
                             np.sum(ce * w) / w.sum(), rtol=1e-5)
  multi = np.array([[1, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0], [0, 1, 0, 0]], np.float32)
  target = multi / np.maximum(multi.sum(1, keepdims=True), 1)
  nll = -np.sum(target * special.log_softmax(logits, axis=1), axis=1)
  valid = w * (multi.sum(1) > 0)
  np.testing.assert_allclose(losses.multilabel_cross_entropy(f32(logits), f32(multi), f32(w)),
                             np.sum(nll * valid) / valid.sum(), rtol=1e-5)
  np.testing.assert_allclose(losses.l1(f32(s / 5), f32(m), f32(w)), np.sum(np.abs(s / 5 - m) * w) / w.sum(),
                             rtol=1e-6)
  # Nothing valid: zero, never NaN.
  assert float(losses.cross_entropy(f32(logits), jnp.asarray(y), jnp.zeros(5))) == 0.0


def test_trainable_parameter_count_vit_b16():
  """The default config on ViT-B/16: a small fraction of the backbone's ~150M parameters."""
  from configs import base  # pylint: disable=g-import-not-at-top
  from mcpf_jax.model.iqa import IQAModel, ModelSpec  # pylint: disable=g-import-not-at-top
  config = base.get_config()
  clip_config = clip.preset("vit-b-16")
  spec = ModelSpec.from_config(config.model, num_layers=12)
  ids = tuple((s, ((0,) * 77,) * len(spec.class_phrases(s))) for s in spec.class_sets)
  shapes = jax.eval_shape(IQAModel(clip_config, spec, ids).init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))["params"]
  mask = freeze.mask(shapes, config.model.trainable)
  n_train, n_frozen = freeze.count(shapes, mask), freeze.count(shapes, mask, freeze.FROZEN)
  assert 140e6 < n_frozen < 160e6
  assert n_train < 0.05 * n_frozen  # 4.25M of 149.6M with the defaults (python -m mcpf_jax.model.summary)


def test_summary_command_prints_only_its_report():
  """`python -m mcpf_jax.model.summary` as a user types it (no JAX_PLATFORMS): its lines on stdout, and nothing on
  stderr (no libtpu errors, no "Unable to initialize backend 'tpu'" from jax's backend probing)."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  proc = subprocess.run([sys.executable, "-m", "mcpf_jax.model.summary"], cwd=pathlib.Path(__file__).parents[1],
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and proc.stderr == "", proc.stderr
  first, *groups, last = proc.stdout.splitlines()
  assert first == "mcpf on openai/clip-vit-base-patch16"
  counts = {line.split()[0]: (int(line.split()[1].replace(",", "")), line.split()[2]) for line in groups}
  report = json.loads(last)
  assert counts["clip"] == (report["frozen"], "frozen")
  assert sum(n for n, kind in counts.values() if kind == "trainable") == report["trainable"]
