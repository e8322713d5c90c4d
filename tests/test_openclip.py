"""OpenCLIP checkpoints on our CLIP towers: parity with open_clip 3.3's own `CLIP` (PyTorch).

Tiny random models are built by open_clip itself (its `model.CLIP` class, from the model config dict its
`create_model` would pass), every tensor replaced by normal noise, and written in the format of open_clip's hub
export (`save_for_hf`: `open_clip_config.json` = {"model_cfg", "preprocess_cfg"}, the state dict as
`open_clip_model.safetensors` and/or the `open_clip_pytorch_model.bin` pickle); our loader reads the folder and the
features and logits are compared with open_clip's `encode_image` / `encode_text` / `get_logits`: 1e-5 relative in
float32, the CLIP tests' bound in bfloat16. The real checkpoints (LAION, DataComp, ...) cannot be downloaded here;
the tiny ones have the same files, names and code paths.

open_clip does not import as a package without torchvision, which is not installed (its pin breaks torch's CPU
build, see requirements-test.txt): its modules are imported from its installed files under another package name,
with torchvision's `FrozenBatchNorm2d` (which `open_clip.utils` imports to freeze ResNet BatchNorms, a path these
models never take) supplied for that import only. The model code that runs is open_clip's, unchanged.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.machinery
import json
import pathlib
import sys
import types

import jax
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
import transformers.models.auto  # (imported before the torchvision stand-in below exists)

from mcpf_jax import clip
from mcpf_jax.clip import checkpoint, openclip

pytestmark = pytest.mark.torch

OPEN_CLIP_DIR = pathlib.Path(transformers.__file__).resolve().parents[1] / "open_clip"
BF16_TOLERANCE = 0.03  # as tests/test_clip_model.py: bf16 towers vs the float32 truth, relative to max |value|
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
TEXTS = ["a photo of a cat", "a blurry, noisy picture!", "an excellent photo of a dog in the snow",
         "word " * 100]


@functools.cache
def _open_clip() -> types.ModuleType:
  """open_clip's `model` module (and with it `transformer`, `tokenizer`), from its installed files."""
  name = "open_clip_reference"
  if name not in sys.modules:
    package = types.ModuleType(name)
    package.__path__ = [str(OPEN_CLIP_DIR)]
    package.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    sys.modules[name] = package
  stand_in = {}
  for part in ("torchvision", "torchvision.ops", "torchvision.ops.misc"):
    module = types.ModuleType(part)
    module.__spec__ = importlib.machinery.ModuleSpec(part, None)
    stand_in[part] = module
  stand_in["torchvision.ops.misc"].FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})
  assert not any(k in sys.modules for k in stand_in), "torchvision is installed: import open_clip directly"
  sys.modules.update(stand_in)
  try:
    model = importlib.import_module(f"{name}.model")
    importlib.import_module(f"{name}.tokenizer")
  finally:
    for k in stand_in:
      del sys.modules[k]
  return model


def _model_cfg(quick_gelu: bool = True, pool_type: str = "argmax", layers: tuple[int, int] = (3, 2), **text) -> dict:
  """Tiny ViT CLIP; text and vision widths and depths differ, so a swapped or transposed tensor cannot fit."""
  return {"embed_dim": 24, "quick_gelu": quick_gelu,
          "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 48, "head_width": 8, "layers": layers[0]},
          "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": layers[1],
                       "pool_type": pool_type, **text}}


def _write(folder: pathlib.Path, model_cfg: dict, seed: int, weights=(openclip.SAFETENSORS,)):
  """open_clip's CLIP with every tensor N(0, 0.5^2), written as open_clip's `save_for_hf` writes it."""
  torch.manual_seed(seed)
  model = _open_clip().CLIP(**copy.deepcopy(model_cfg)).eval()
  gen = torch.Generator().manual_seed(seed)
  model.load_state_dict({k: 0.5 * torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()})
  folder.mkdir(parents=True, exist_ok=True)
  tensors = model.state_dict()
  if openclip.SAFETENSORS in weights:
    safetensors.torch.save_file(tensors, folder / openclip.SAFETENSORS)
  if openclip.PICKLE in weights:
    torch.save(tensors, folder / openclip.PICKLE)
  preprocess = {"mean": list(openclip.OPENAI_MEAN), "std": list(openclip.OPENAI_STD)}  # model.visual.image_mean/std
  (folder / openclip.CONFIG).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=2))
  return model


def _inputs(seed: int, tokenizer, eos: int | None = None):
  rng = np.random.default_rng(seed)
  pixels = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
  ids = np.concatenate([tokenizer(TEXTS), rng.integers(0, 49406, size=(3, 77))]).astype(np.int32)
  ids[4:, 0] = openclip.SOT_ID
  for row, end in zip(ids[4:], (9, 40, 76)):  # the end-of-text token (the largest id) at varied positions
    row[end] = openclip.EOT_ID if eos is None else eos
  if eos is not None:
    ids[:4][ids[:4] == openclip.EOT_ID] = eos
  return pixels, ids


def _theirs(model, pixels, ids):
  with torch.no_grad():
    image = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    text = torch.from_numpy(ids.astype(np.int64))
    return {"image": model.encode_image(image).numpy(), "text": model.encode_text(text).numpy(),
            "logits": model.get_logits(image, text)[0].numpy()}


@functools.partial(_jit, static_argnames=("model",))
def _ours(model, params, pixels, ids):
  p = {"params": params}
  return {"image": model.apply(p, pixels, method="encode_image"), "text": model.apply(p, ids, method="encode_text"),
          "logits": model.apply(p, pixels, ids)}


def _rel(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


# Measured: 2.8e-7 to 1.2e-6 relative (features and logits) in float32; bfloat16 image 7.6e-3, text 4.6e-3.
# quick_gelu on and off; every text pool type; the Linear text projection with a bias; GELU's tanh form and another
# LayerNorm eps (act_kwargs / norm_kwargs); the .bin pickle read through torch.
CASES = {
    "quickgelu_argmax": (_model_cfg(True, "argmax"), openclip.SAFETENSORS, None),
    "gelu_argmax_projbias_bin": (_model_cfg(False, "argmax", proj_bias=True), openclip.PICKLE, None),
    "gelu_eos": (_model_cfg(False, "eos", eos_id=500), openclip.SAFETENSORS, 500),
    "gelu_first": (_model_cfg(False, "first"), openclip.SAFETENSORS, None),
    "tanh_last_eps": (_model_cfg(False, "last", act_kwargs={"approximate": "tanh"}, norm_kwargs={"eps": 1e-6}),
                      openclip.SAFETENSORS, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_open_clip(case, tmp_path):
  model_cfg, weights, eos = CASES[case]
  theirs_model = _write(tmp_path, model_cfg, seed=len(case), weights=(weights,))
  bundle = clip.load(tmp_path)
  assert bundle.source.endswith(weights)
  assert bundle.config.text.pool_rule == model_cfg["text_cfg"]["pool_type"]
  pixels, ids = _inputs(seed=1, tokenizer=bundle.tokenizer, eos=eos)
  ours, theirs = _ours(bundle.model, bundle.params, pixels, ids), _theirs(theirs_model, pixels, ids)
  errors = {k: _rel(ours[k], theirs[k]) for k in theirs}
  assert all(e < 1e-5 for e in errors.values()), errors
  if model_cfg["text_cfg"]["pool_type"] != "first":  # (position 0 is SOT in every row: one feature for all)
    assert np.std(theirs["text"], axis=0).min() > 1e-3  # the rows differ: the pooled position matters


def test_bfloat16_and_weights_round_trip(tmp_path):
  """bfloat16 compute within the CLIP tests' bound of the float32 truth; our tree written back as open_clip's state
  dict loads into open_clip strictly and is the file's."""
  model_cfg = _model_cfg(True, "argmax")
  theirs_model = _write(tmp_path, model_cfg, seed=7)
  bundle = clip.load(tmp_path, dtype="bfloat16")
  pixels, ids = _inputs(seed=2, tokenizer=bundle.tokenizer)
  truth, low = _theirs(theirs_model, pixels, ids), _ours(bundle.model, bundle.params, pixels, ids)
  for key in ("image", "text"):
    assert _rel(low[key], truth[key]) < BF16_TOLERANCE, key
  state = openclip.to_state_dict(bundle.params, bundle.config)
  reference = theirs_model.state_dict()
  assert set(state) == set(reference)
  for key, value in reference.items():
    np.testing.assert_array_equal(state[key], value.numpy(), err_msg=key)
  _open_clip().CLIP(**copy.deepcopy(model_cfg)).load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})


def test_tokenizer_is_open_clips(tmp_path):
  """open_clip's SimpleTokenizer (what open_clip tokenizes these models with): the same ids, padding 0."""
  _write(tmp_path, _model_cfg(), seed=3)
  bundle = clip.load(tmp_path)
  assert clip.config.from_name(str(tmp_path)) == bundle.config  # (what pre-flight and summaries read, no weights)
  ours = bundle.tokenizer
  theirs = sys.modules["open_clip_reference.tokenizer"].SimpleTokenizer(context_length=77)
  texts = TEXTS + ["Hello,   World! 123", "&amp; caf\u00e9 \u201cquoted\u201d", ""]
  np.testing.assert_array_equal(ours(texts), theirs(texts).numpy())
  assert ours.pad_token_id == 0


def test_pickle_without_torch_is_refused_then_converted(tmp_path, monkeypatch):
  model = _write(tmp_path, _model_cfg(), seed=4, weights=(openclip.PICKLE,))
  monkeypatch.setattr(openclip, "torch_available", lambda: False)  # as on a machine without torch
  with pytest.raises(ValueError, match=r"open_clip_pytorch_model\.bin.*python -m mcpf_jax\.clip\.openclip convert"):
    clip.load(tmp_path)
  monkeypatch.undo()
  assert openclip.main(["convert", str(tmp_path)]) == 0
  (tmp_path / openclip.PICKLE).unlink()  # the safetensors file alone now
  bundle = clip.load(tmp_path)
  pixels, ids = _inputs(seed=5, tokenizer=bundle.tokenizer)
  assert _rel(_ours(bundle.model, bundle.params, pixels, ids)["text"], _theirs(model, pixels, ids)["text"]) < 1e-5


def _refused(change, match: str) -> None:
  raw = {"model_cfg": _model_cfg(), "preprocess_cfg": {"mean": list(openclip.OPENAI_MEAN)}}
  change(raw)
  with pytest.raises(ValueError, match=match):
    openclip.config_from_openclip(raw, source="cfg.json")


@pytest.mark.parametrize("section,key,value", [
    ("vision_cfg", "attentional_pool", True), ("vision_cfg", "no_ln_pre", True),
    ("vision_cfg", "final_ln_after_pool", True), ("vision_cfg", "pool_type", "avg"),
    ("vision_cfg", "ls_init_value", 1e-4), ("vision_cfg", "timm_model_name", "convnext_base"),
    ("vision_cfg", "qk_norm", True), ("text_cfg", "hf_model_name", "xlm-roberta-base"),
    ("text_cfg", "hf_tokenizer_name", "bert-base-uncased"), ("text_cfg", "no_causal_mask", True),
    ("text_cfg", "pool_type", "none"), ("text_cfg", "embed_cls", True), ("text_cfg", "proj_type", "none"),
    ("text_cfg", "context_length", 64), ("text_cfg", "tokenizer_kwargs", {"clean": "canonicalize"}),
    ("text_cfg", "act_kwargs", {"approximate": "none", "x": 1}), ("vision_cfg", "norm_kwargs", {"bias": False}),
    ("text_cfg", "unknown_field", 1), (None, "custom_text", True), (None, "init_logit_bias", -10),
    (None, "multimodal_cfg", {}), ("vision_cfg", "layers", [3, 4, 6, 3]), ("text_cfg", "vocab_size", 32000),
    ("vision_cfg", "image_size", [32, 48]),
])
def test_unsupported_fields_are_refused_by_name(section, key, value):
  def change(raw):
    (raw["model_cfg"] if section is None else raw["model_cfg"][section])[key] = value
  _refused(change, key)


def test_other_normalisation_and_hf_format_precedence(tmp_path):
  _refused(lambda raw: raw["preprocess_cfg"].update(mean=[0.5, 0.5, 0.5]), r"preprocess_cfg\.mean")
  _write(tmp_path, _model_cfg(), seed=6)
  assert openclip.is_openclip_folder(tmp_path)
  (tmp_path / "config.json").write_text("{}")  # a folder with both formats is read as transformers' CLIP
  assert not openclip.is_openclip_folder(tmp_path)
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    checkpoint.load_folder(tmp_path)


def test_iqa_model_runs_on_an_openclip_backbone(tmp_path):
  """The IQA model on OpenCLIP towers: its zero-depth quality logits are open_clip's own zero-shot logits on the
  class prompts, and one MCPF training step (text and visual prompts, cross-modal fusion) updates the prompts
  and leaves the backbone as it was."""
  from mcpf_jax import model as iqa  # pylint: disable=g-import-not-at-top
  from mcpf_jax.clip import preprocess  # pylint: disable=g-import-not-at-top
  from mcpf_jax.model import freeze  # pylint: disable=g-import-not-at-top
  from mcpf_jax.train import optim  # pylint: disable=g-import-not-at-top
  from mcpf_jax.train import step as train_step_lib  # pylint: disable=g-import-not-at-top
  from tests.batches import iqa_batch  # pylint: disable=g-import-not-at-top

  theirs_model = _write(tmp_path, _model_cfg(False, "argmax", layers=(1, 1)), seed=8)  # (one block: compile time)
  bundle = clip.load(tmp_path)
  base = dict(prompt_depth=1, num_text_prompts=4, num_vision_prompts=4, text_prompt_init="a photo of a",
              fusion_width=16, fusion_heads=2, query_heads=2, aux=())
  model, params = iqa.build({**base, "name": "mcpf", "fusion": "none", "text_depth": 0, "vision_depth": 0}, bundle,
                            jax.random.key(0))
  ids = iqa.class_token_ids(model.spec, bundle.tokenizer)["quality"]
  pixels = np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype(np.float32)
  ours = np.asarray(_jit(model.apply)({"params": params}, pixels)["quality_logits"])
  assert _rel(ours, _theirs(theirs_model, pixels, ids)["logits"]) < 1e-5

  model, params = iqa.build({**base, "name": "mcpf"}, bundle, jax.random.key(0))
  mask = freeze.mask(params, "prompts")
  tx = optim.make_optimizer(types.SimpleNamespace(lr=1e-2, warmup_steps=0, total_steps=10, final_lr_fraction=0.0,
                                                  weight_decay=0.0, b1=0.9, b2=0.999, grad_clip_norm=0.0), mask)
  step = _jit(train_step_lib.make_train_step(model, mask, tx, {"rank": 1.0, "l1": 1.0, "cls": 0.5, "aux": 0.0}))
  state, metrics = step(train_step_lib.init_state(params, tx), iqa_batch(4, 32))
  assert bool(metrics["finite"]) and np.isfinite(float(metrics["loss"]))
  new = state["params"]
  assert np.any(np.asarray(new["text_prompts_all"]) != np.asarray(params["text_prompts_all"]))
  same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), new["clip"], params["clip"])
  assert all(jax.tree.leaves(same))
  assert preprocess.CLIP_MEAN == openclip.OPENAI_MEAN and preprocess.CLIP_STD == openclip.OPENAI_STD


def test_hub_cache_and_export_of_an_openclip_backbone(tmp_path, monkeypatch):
  """A hub repo with only the OpenCLIP files, laid out as huggingface_hub caches it, loads offline by its id (in
  open_clip's `hf-hub:` spelling); the export copies its weights and open_clip_config.json, which load to the same
  fingerprint."""
  import huggingface_hub  # pylint: disable=g-import-not-at-top

  from mcpf_jax import export  # pylint: disable=g-import-not-at-top

  commit = "0123456789abcdef0123456789abcdef01234567"
  repo = tmp_path / "cache" / "models--laion--tiny-openclip"
  _write(repo / "snapshots" / commit, _model_cfg(), seed=9)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(commit)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
  bundle = clip.load("hf-hub:laion/tiny-openclip")
  assert bundle.source == f"hf://laion/tiny-openclip@{commit}/{openclip.SAFETENSORS}"
  copied = export._copy_backbone(bundle.source, None, tmp_path / "out")  # pylint: disable=protected-access
  assert sorted(copied) == sorted([openclip.SAFETENSORS, openclip.CONFIG])
  assert clip.load(tmp_path / "out").fingerprint == bundle.fingerprint
