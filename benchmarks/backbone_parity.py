"""Per-family parity table of BENCHMARKS.md: our towers against the reference implementations, on the tests' own tiny
random models (the real checkpoints cannot be downloaded on this machine).

  python benchmarks/backbone_parity.py [--out benchmarks/results/backbone_parity.json]

Families and references: CLIP against transformers' `CLIPModel` (tests/test_clip_model.py's tiny model and inputs),
SigLIP against transformers' `SiglipModel` (tests/test_siglip.py's), SigLIP 2 against `SiglipModel` with SigLIP 2's
text side (tests/siglip_support.py: 64 positions, a Gemma-format tokenizer.json; the ids of five prompts from
transformers' `Siglip2Tokenizer`, checked equal to ours), OpenCLIP against open_clip 3.3's `CLIP`
(tests/test_openclip.py's QuickGELU / argmax model). For each: image features, text features and image-text logits,
max |ours - reference| and that over max |reference| (the "relative" figure the tests bound: 1e-5 in float32, 0.03
for bfloat16 compute with bfloat16 storage, against the float32 reference).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

# pylint: disable=wrong-import-position
import torch  # noqa: E402
import transformers  # noqa: E402

from mcpf_jax import clip  # noqa: E402

PROMPTS = ["a photo of a bad quality image.", "Good photo.", "x x x x perfect quality.", "poor quality. fair quality.",
           ""]


def _errors(ours: dict, ref: dict) -> dict:
  out = {}
  for key in ("image", "text", "logits"):
    a, b = np.asarray(ours[key], np.float64), np.asarray(ref[key], np.float64)
    assert a.shape == b.shape, (key, a.shape, b.shape)
    diff = float(np.max(np.abs(a - b)))
    out[key] = {"abs": diff, "rel": diff / float(np.max(np.abs(b)))}
  return out


def clip_family(tmp: pathlib.Path) -> dict:
  import test_clip_model as t  # pylint: disable=import-outside-toplevel
  hf_model = t._perturbed(t._hf_config(layers=2), seed=3)  # the `tiny` fixture
  hf_model.save_pretrained(tmp)
  pixels, ids = t._inputs(seed=6, eos=500)
  ref = t._torch_outputs(hf_model, pixels, ids)
  return {dtype: _errors(t._ours(clip.load(tmp, dtype=dtype, param_dtype=dtype), pixels, ids), ref)
          for dtype in ("float32", "bfloat16")}


def siglip_family(tmp: pathlib.Path) -> dict:
  import test_siglip as t  # pylint: disable=import-outside-toplevel
  hf_model = t._perturbed(t._hf_config(), seed=0)  # the `tiny` fixture
  hf_model.save_pretrained(tmp)
  pixels, ids = t._inputs(2)
  ref = t._torch_outputs(hf_model, pixels, ids)
  out = {}
  for dtype in ("float32", "bfloat16"):
    bundle = clip.load(tmp, dtype=dtype, param_dtype=dtype)
    out[dtype] = _errors(t._forward(bundle.model, bundle.params, pixels, ids), ref)
  return out


def siglip2_family(tmp: pathlib.Path) -> dict:
  import siglip_support  # pylint: disable=import-outside-toplevel
  import test_siglip as t  # pylint: disable=import-outside-toplevel
  hf_model = siglip_support.write_tiny_siglip(tmp, seed=1)
  theirs_tok = transformers.Siglip2Tokenizer.from_pretrained(tmp, padding_side="right")
  ids = np.asarray(theirs_tok(PROMPTS, padding="max_length", max_length=64, truncation=True)["input_ids"], np.int32)
  pixels = np.random.default_rng(3).normal(size=(3, 32, 32, 3)).astype(np.float32)
  ref = t._torch_outputs(hf_model, pixels, ids)
  out = {}
  for dtype in ("float32", "bfloat16"):
    bundle = clip.load(tmp, dtype=dtype, param_dtype=dtype)
    np.testing.assert_array_equal(bundle.tokenizer(PROMPTS), ids)  # our tokenizer gives transformers' ids
    out[dtype] = _errors(t._forward(bundle.model, bundle.params, pixels, ids), ref)
  return out


def openclip_family(tmp: pathlib.Path) -> dict:
  import test_openclip as t  # pylint: disable=import-outside-toplevel
  theirs = t._write(tmp, t._model_cfg(True, "argmax"), seed=len("quickgelu_argmax"))
  out = {}
  for dtype in ("float32", "bfloat16"):
    bundle = clip.load(tmp, dtype=dtype, param_dtype=dtype)
    pixels, ids = t._inputs(seed=1, tokenizer=bundle.tokenizer)
    out[dtype] = _errors(t._ours(bundle.model, bundle.params, pixels, ids), t._theirs(theirs, pixels, ids))
  return out


FAMILIES = {"CLIP (transformers CLIPModel)": clip_family, "SigLIP (transformers SiglipModel)": siglip_family,
            "SigLIP 2 (SiglipModel + Siglip2Tokenizer)": siglip2_family,
            "OpenCLIP (open_clip 3.3 CLIP)": openclip_family}


def table(results: dict) -> str:
  lines = ["| family | compute / storage | image abs | image rel | text abs | text rel | logits abs | logits rel |",
           "|---|---|---|---|---|---|---|---|"]
  for family, by_dtype in results.items():
    for dtype, e in by_dtype.items():
      cells = " | ".join(f"{e[k]['abs']:.1e} | {e[k]['rel']:.1e}" for k in ("image", "text", "logits"))
      lines.append(f"| {family} | {dtype} | {cells} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "backbone_parity.json"))
  args = parser.parse_args()
  torch.set_num_threads(2)
  results = {}
  for name, fn in FAMILIES.items():
    with tempfile.TemporaryDirectory() as tmp:
      results[name] = fn(pathlib.Path(tmp))
  meta = {"torch": torch.__version__, "transformers": transformers.__version__}
  pathlib.Path(args.out).write_text(json.dumps({"versions": meta, "results": results}, indent=1) + "\n")
  print(table(results))


if __name__ == "__main__":
  main()
