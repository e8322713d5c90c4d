"""The compiled scorer: `python -m mcpf_jax.export --stablehlo` writes model.stablehlo (jax.export, symbolic batch,
CPU + CUDA + TPU), and `mcpf_jax.compiled` scores with it in a process that imports none of the model code, giving
the Scorer's scores on the 55 images of the CLIVE miniature; `--onnx` writes model.onnx, which ONNX Runtime runs
without jax to the same scores.

Cost: one export of conftest's `smoke_run` writes both (`--stablehlo --onnx`), and the Scorer's reference scores
of the 55 images are computed once (module fixtures), for every test of the file."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mcpf_jax.scoring import Scorer

REPO = pathlib.Path(__file__).resolve().parent.parent

# Run in a fresh process: score with the artifact, then list which mcpf_jax modules were ever imported.
_SCORE_AND_LIST_MODULES = """
import json, sys
from mcpf_jax import compiled
scorer = compiled.CompiledScorer(sys.argv[1])
results = scorer.score(sys.argv[2:])
print(json.dumps({"results": results, "modules": sorted(m for m in sys.modules if m.startswith("mcpf_jax")),
                  "flax": "flax" in sys.modules}))
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory, smoke_run):
  root = tmp_path_factory.mktemp("compiled")
  workdir = root / "run"
  shutil.copytree(smoke_run.workdir, workdir)
  # The backbone is included for the Scorer that gives the reference scores; the artifacts themselves need none.
  proc = subprocess.run([sys.executable, "-m", "mcpf_jax.export", "--workdir", str(workdir), "--output",
                         str(root / "out"), "--stablehlo", "--onnx", "--include_backbone"], cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  files = json.loads(proc.stdout.strip().splitlines()[-1])["files"]
  assert "model.stablehlo" in files and "model.onnx" in files, files
  return root / "out"


@pytest.fixture(scope="module")
def reference(folder, test_data) -> dict[str, float]:
  """{path: score} of the Scorer (the model code) on the 55 CLIVE images, from the exported folder."""
  return {r.path: r.score for r in Scorer.from_pretrained(folder, batch_size=8).score(_clive(test_data))}


def test_config_says_the_contract(folder):
  config = json.loads((folder / "config.json").read_text())
  info, prep = config["stablehlo"], config["preprocessing"]
  assert info["file"] == "model.stablehlo" and info["platforms"] == ["cpu", "cuda", "tpu"]
  assert info["input"] == {"name": "crops", "dtype": "uint8",
                           "shape": ["batch", prep["num_crops"], prep["image_size"], prep["image_size"], 3]}
  assert info["output"] == {"name": "score", "dtype": "float32", "shape": ["batch"]}
  assert isinstance(info["calling_convention_version"], int)


def _clive(test_data) -> list[str]:
  root = test_data / "clive-mini" / "ChallengeDB_release" / "Images"
  return sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".bmp"))


def test_compiled_scores_equal_the_scorer_without_the_model_code(folder, reference, test_data, tmp_path):
  images = _clive(test_data)
  assert len(images) == 55
  broken = tmp_path / "broken.jpg"
  broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  proc = subprocess.run([sys.executable, "-c", _SCORE_AND_LIST_MODULES, str(folder), images[0], str(broken),
                         *images[1:]], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout)
  # Nothing of the model, CLIP, scoring or training code, and no Flax: jax runs the artifact alone.
  assert out["modules"] == ["mcpf_jax", "mcpf_jax.compiled", "mcpf_jax.images"], out["modules"]
  assert out["flax"] is False
  results = {path: (score, error) for path, score, error in out["results"]}
  assert results[str(broken)][0] is None and "cannot decode image" in results[str(broken)][1]
  ours = np.array([results[p][0] for p in images])
  theirs = np.array([reference[p] for p in images])
  rel = np.max(np.abs(ours - theirs) / np.abs(theirs))
  print(f"compiled vs Scorer over 55 CLIVE images: max relative difference {rel:.3g}")
  assert rel <= 1e-5
  assert np.ptp(theirs) > 1e-3


def test_cli_prints_one_line_per_image_and_refuses_a_folder_without_the_artifact(folder, test_data, tmp_path):
  images = _clive(test_data)[:3]
  proc = subprocess.run([sys.executable, "-m", "mcpf_jax.compiled", str(folder)] + [str(p) for p in images],
                        cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  lines = [json.loads(line) for line in proc.stdout.splitlines()]
  assert [line["path"] for line in lines] == [str(p) for p in images]
  assert all(isinstance(line["score"], float) and line["error"] is None for line in lines)
  plain = tmp_path / "plain"
  plain.mkdir()
  config = json.loads((folder / "config.json").read_text())
  del config["stablehlo"]
  (plain / "config.json").write_text(json.dumps(config))
  proc = subprocess.run([sys.executable, "-m", "mcpf_jax.compiled", str(plain), str(images[0])], cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2 and "--stablehlo" in proc.stderr and proc.stdout == ""


_ORT_SCORES = """
import json, sys
import numpy as np, onnxruntime
from mcpf_jax import images
config = json.load(open(sys.argv[1] + "/config.json"))
prep, info = config["preprocessing"], config["onnx"]
session = onnxruntime.InferenceSession(sys.argv[1] + "/" + info["file"], providers=["CPUExecutionProvider"])
crops = np.stack([images.eval_crops(open(p, "rb").read(), p, resize=prep["resize"], image_size=prep["image_size"],
                                    num_crops=prep["num_crops"])[0] for p in sys.argv[2:]])
(score,) = session.run(["score"], {"crops": crops})
print(json.dumps({"scores": score.tolist(), "inputs": [(i.name, i.type, i.shape) for i in session.get_inputs()],
                  "jax": "jax" in sys.modules}))
"""


def test_onnx_scores_equal_the_scorer_in_onnxruntime(folder, reference, test_data):
  config = json.loads((folder / "config.json").read_text())
  assert config["onnx"]["file"] == "model.onnx" and config["onnx"]["input"]["name"] == "crops"
  images = _clive(test_data)
  # onnxruntime, numpy and the crop function alone: no jax is imported (mcpf_jax.images is PIL + numpy).
  proc = subprocess.run([sys.executable, "-c", _ORT_SCORES, str(folder), *images], cwd=REPO, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout)
  assert out["jax"] is False
  assert out["inputs"] == [["crops", "tensor(uint8)", ["batch", config["preprocessing"]["num_crops"], 64, 64, 3]]]
  ours, theirs = np.array(out["scores"]), np.array([reference[p] for p in images])
  rel = np.max(np.abs(ours - theirs) / np.abs(theirs))
  size = (folder / "model.onnx").stat().st_size
  print(f"onnxruntime vs Scorer over 55 CLIVE images: max relative difference {rel:.3g}; model.onnx {size} bytes")
  assert rel <= 1e-4
