"""Exported models (mcpf_jax.export, Scorer.from_pretrained, score.py --pretrained), old checkpoints, score_fn.

A smoke run is trained, evaluated and exported; the exported folder must score the CLIVE miniature exactly as the
run's checkpoint does, after the workdir is deleted, offline, from a folder and from the Hugging Face cache
layout under a hub id. A checkpoint of layout 1 (one `state` item, before params/opt/meta were saved apart;
tests/fixtures/old_checkpoint, made by tests/fixtures/make_old_checkpoint.py at 6e90e98) must restore to the scores
that version gave.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from mcpf_jax import images, pretrained, runs
from mcpf_jax.scoring import Scorer
from mcpf_jax.smoke import backbone

REPO = pathlib.Path(__file__).resolve().parents[1]
OLD = REPO / "tests" / "fixtures" / "old_checkpoint"
HUB_ID = "mcpf-tests/smoke-iqa"


def _env(tmp: pathlib.Path) -> dict[str, str]:
  """Offline, with an empty Hugging Face cache of its own: nothing can come from the network or a warm cache."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_HOME=str(tmp / "hf_home"),
             HF_HUB_CACHE=str(tmp / "hf_home" / "hub"), PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)
  return env


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
  proc = subprocess.run([sys.executable] + argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, f"{argv} exited with {proc.returncode}:\n{proc.stderr[-4000:]}"
  return proc


def _scores(path: pathlib.Path) -> tuple[dict, dict[str, float]]:
  out = json.loads(path.read_text())
  assert out["summary"]["failed"] == 0, out["summary"]
  return out["scorer"], {r["path"]: r["score"] for r in out["results"]}


@pytest.fixture(scope="module")
def clive(test_data) -> pathlib.Path:
  return test_data / "clive-mini" / "ChallengeDB_release" / "Images"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, clive, smoke_run):
  """A copy of the session's trained and evaluated smoke run (conftest.py), scored with score.py --workdir,
  exported twice, then deleted."""
  root = tmp_path_factory.mktemp("export")
  workdir = root / "run"
  shutil.copytree(smoke_run.workdir, workdir)
  eval_json, config = smoke_run.evaluation, smoke_run.config
  env = _env(root)
  _run(["score.py", "--workdir", str(workdir), "--format", "json", "-o", str(root / "checkpoint.json"),
        "--no_progress", str(clive)], env)
  full = json.loads(_run(["-m", "mcpf_jax.export", "--workdir", str(workdir), "--output", str(root / "full"),
                          "--include_backbone"], env).stdout.strip().splitlines()[-1])
  small = json.loads(_run(["-m", "mcpf_jax.export", "--workdir", str(workdir), "--output", str(root / "small")],
                          env).stdout.strip().splitlines()[-1])
  tiny_clip = root / "tiny_clip_copy"  # the run's backbone, kept to give it to the small folder explicitly
  shutil.copytree(workdir / "tiny_clip", tiny_clip)
  shutil.rmtree(workdir)
  return {"root": root, "full": root / "full", "small": root / "small", "full_info": full, "small_info": small,
          "eval": eval_json, "config": config, "tiny_clip": tiny_clip, "env": env}


def test_exported_folder_scores_like_the_checkpoint_offline_without_the_workdir(exported, clive):
  root, env = exported["root"], exported["env"]
  _run(["score.py", "--pretrained", str(exported["full"]), "--format", "json", "-o", str(root / "pretrained.json"),
        "--no_progress", str(clive)], env)
  info_ckpt, by_ckpt = _scores(root / "checkpoint.json")
  info_pre, by_pre = _scores(root / "pretrained.json")
  assert len(by_ckpt) == 55 and sorted(by_ckpt) == sorted(by_pre)
  diff = max(abs(by_ckpt[k] - by_pre[k]) for k in by_ckpt)
  print(f"max |score.py --pretrained - score.py --workdir| over {len(by_ckpt)} CLIVE images: {diff:.3g}")
  assert diff <= 1e-6
  assert np.ptp(list(by_pre.values())) > 1e-3  # the images really get different scores
  # What the score means travels with it, in the JSON output.
  for info in (info_ckpt, info_pre):
    assert info["scale"] == "MOS of smoke" and info["higher_is_better"] is True and info["dataset"] == "smoke"
    assert info["score_range"] == [1.0, 5.0]
    assert all(1.0 <= s <= 5.0 for s in by_pre.values())
  assert info_pre["backbone"] == str(exported["full"] / "clip" / "model.safetensors")
  assert not (root / "hf_home" / "hub").exists() or not any((root / "hf_home" / "hub").iterdir())


def test_the_folder_holds_the_model_and_no_optimizer_state(exported):
  files = set(exported["full_info"]["files"])
  assert {"config.json", "model.safetensors", "README.md", "clip/config.json", "clip/model.safetensors"} <= files
  assert set(exported["small_info"]["files"]) == {"config.json", "model.safetensors", "README.md"}
  with safe_open(str(exported["small"] / "model.safetensors"), "np") as f:
    keys = list(f.keys())
    sizes = {k: f.get_slice(k).get_shape() for k in keys}
  # Only the model's own parameters: prompts and fusion; no Adam moments, no step count, no backbone.
  assert keys and all(k.startswith(("text_prompts_", "vision_prompts", "fusion/")) for k in keys), keys
  assert not any(part in ("mu", "nu", "count", "opt", "step") for k in keys for part in k.split("/"))
  config = pretrained.read_config(exported["small"])
  assert config["backbone"]["fingerprint"] and config["backbone"]["included"] is False
  assert config["score"]["higher_is_better"] is True and config["score"]["score_range"] == [1.0, 5.0]
  assert config["preprocessing"] == dict(config["preprocessing"], resize=256, image_size=64, num_crops=9)
  assert config["training"]["eval"]["srcc"] == pytest.approx(exported["eval"]["srcc"])
  n = sum(int(np.prod(s)) for s in sizes.values())
  assert exported["small_info"]["files"]["model.safetensors"] < 4 * n + 64 * 1024  # float32 + a small header
  card = (exported["small"] / "README.md").read_text()
  assert card.startswith("---\nlibrary_name: mcpf_jax") and "MOS of smoke" in card and "[1, 5]" in card
  assert f"{exported['eval']['srcc']:.4f}" in card and "num_crops = 9" in card and "split by content" in card


def test_a_missing_backbone_is_a_clear_error_and_clip_provides_it(exported, clive):
  small = exported["small"]
  fingerprint = pretrained.read_config(small)["backbone"]["fingerprint"]
  with pytest.raises(FileNotFoundError, match=rf"needs the CLIP backbone .*fingerprint {fingerprint}.*--clip"):
    Scorer.from_pretrained(small)
  img = sorted(clive.glob("*.JPG"))[0]
  with_clip = Scorer.from_pretrained(small, clip_name=exported["tiny_clip"], batch_size=4)
  full = Scorer.from_pretrained(exported["full"], batch_size=4)
  assert with_clip.score(img)[0].score == pytest.approx(full.score(img)[0].score, abs=1e-6)
  other = backbone.write(exported["root"] / "other_clip", seed=exported["config"].clip.tiny_seed + 1,
                         **exported["config"].clip.tiny)
  with pytest.raises(ValueError, match=rf"fingerprint {fingerprint}.*has fingerprint"):
    Scorer.from_pretrained(small, clip_name=other)


def _place_in_hub_cache(folder: pathlib.Path, cache: pathlib.Path, repo_id: str, commit: str) -> None:
  """huggingface_hub's cache layout: models--org--name/{blobs/<hash>, snapshots/<commit>/<file> -> blob, refs/main}."""
  repo = cache / ("models--" + repo_id.replace("/", "--"))
  for path in sorted(p for p in folder.rglob("*") if p.is_file()):
    import hashlib  # pylint: disable=g-import-not-at-top
    blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, blob)
    link = repo / "snapshots" / commit / path.relative_to(folder)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
  (repo / "refs").mkdir(parents=True)
  (repo / "refs" / "main").write_text(commit)


def test_the_folder_in_the_hub_cache_loads_by_its_id_offline(exported, clive, tmp_path):
  env = _env(tmp_path)
  commit = "0123456789abcdef0123456789abcdef01234567"
  _place_in_hub_cache(exported["full"], pathlib.Path(env["HF_HUB_CACHE"]), HUB_ID, commit)
  imgs = [str(p) for p in sorted(clive.glob("*.JPG"))[:6]]
  code = (f"import json, sys; from mcpf_jax.scoring import Scorer\n"
          f"s = Scorer.from_pretrained({HUB_ID!r}, batch_size=4)\n"
          f"print(json.dumps({{'info': s.info, 'scores': [r.score for r in s.score({imgs!r})]}}))\n")
  out = json.loads(_run(["-c", code], env).stdout.strip().splitlines()[-1])
  assert out["info"]["folder"].endswith(f"snapshots/{commit}") and out["info"]["pretrained"] == HUB_ID
  _, by_ckpt = _scores(exported["root"] / "checkpoint.json")
  assert max(abs(a - by_ckpt[p]) for a, p in zip(out["scores"], imgs)) <= 1e-6
  # An id that is not in the cache, offline: a clear error naming HF_HUB_OFFLINE.
  missing = subprocess.run([sys.executable, "score.py", "--pretrained", "mcpf-tests/not-there", imgs[0]], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=600)
  assert missing.returncode == 1
  assert "mcpf-tests/not-there" in missing.stderr and "HF_HUB_OFFLINE" in missing.stderr, missing.stderr[-2000:]


def test_score_fn_equals_the_scorer_and_its_pixel_gradient_matches_finite_differences(exported, clive):
  scorer = Scorer.from_pretrained(exported["full"], batch_size=2)
  img = images.load(str(sorted(clive.glob("*.JPG"))[3]))
  crops = scorer.preprocessing.crops(img, "test")[0]  # uint8 [9, 64, 64, 3]: the Scorer's own crops
  per_crop = np.asarray(jax.jit(scorer.score_fn)(crops))
  assert per_crop.shape == (9,) and np.ptp(per_crop) > 0
  (result,) = scorer.score(img)
  assert per_crop.mean() == pytest.approx(result.score, rel=1e-6, abs=1e-6)
  from mcpf_jax.clip import preprocess  # pylint: disable=g-import-not-at-top
  x = preprocess.normalize(crops[:2])  # normalised float pixels, the differentiable input
  np.testing.assert_allclose(np.asarray(scorer.score_fn(x)), per_crop[:2], rtol=1e-6)
  loss = jax.jit(lambda x: jnp.sum(scorer.score_fn(x)))
  grad = np.asarray(jax.grad(lambda x: jnp.sum(scorer.score_fn(x)))(x), np.float64)
  assert np.abs(grad).max() > 0
  rng = np.random.default_rng(0)
  for _ in range(3):  # directional derivatives: central differences against <grad, direction>
    d = rng.standard_normal(x.shape).astype(np.float32)
    d /= np.linalg.norm(d)
    eps = 1e-2
    fd = (float(loss(x + eps * d)) - float(loss(x - eps * d))) / (2 * eps)
    analytic = float(np.sum(grad * d))
    assert fd == pytest.approx(analytic, rel=2e-2, abs=1e-4), (fd, analytic)
  with pytest.raises(ValueError, match=r"expected crops of \[\.\.\., 64, 64, 3\]"):
    scorer.score_fn(np.zeros((1, 32, 32, 3), np.uint8))


def test_checkpoint_written_before_this_change_restores_to_its_scores(tmp_path, clive):
  work = tmp_path / "old"
  shutil.copytree(OLD, work)  # the tiny CLIP is rewritten into the copy, never into the fixture
  expected = json.loads((work / "expected_scores.json").read_text())
  step_dir = work / "checkpoints" / str(expected["step"])
  assert runs.layout(step_dir) == 1 and not (step_dir / runs.PARAMS).exists()
  scorer = Scorer.from_checkpoint(work, "latest", batch_size=4)
  got = [r.score for r in scorer.score([clive / n for n in expected["images"]])]
  # The old version decoded every image at full size; 1024.JPG (960x640, at least twice the run's 256-px short
  # side) is now decoded at a reduced DCT scale (images.decode(short_side=...)), within a grey level on average:
  # its score moves by ~0.02 on the 1..5 scale. The images decoded whole keep their scores exactly.
  for name, a, b in zip(expected["images"], got, expected["scores"]):
    assert abs(a - b) <= (0.05 if name == "1024.JPG" else 1e-6), (name, a, b)
  # A resumed run restores the whole state (parameters, Adam moments, step) from the old layout too.
  from mcpf_jax import model as iqa  # pylint: disable=g-import-not-at-top
  from mcpf_jax.model import freeze
  from mcpf_jax.train import checkpoints as ckpt_lib  # pylint: disable=g-import-not-at-top
  from mcpf_jax.train import optim, restore
  from mcpf_jax.train import step as step_lib
  config = runs.run_config(work, {})
  _, params = iqa.build(config.model, runs.load_clip(config, work), jax.random.key(config.seed))
  mask = freeze.mask(params, config.model.trainable)
  state = step_lib.init_state(params, optim.make_optimizer(restore.optim_config(config, 9), mask))
  ckpts = ckpt_lib.Checkpoints(work / "checkpoints", read_only=True)
  restored = ckpts.restore(expected["step"], state, mask)
  ckpts.close()
  assert int(restored["step"]) == expected["step"]
  counts = [int(c) for c in jax.tree.leaves(restored["opt"]) if np.ndim(c) == 0]
  assert counts and all(c == expected["step"] for c in counts)
  alone = runs.read_params(step_dir)
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  restored_flat = traverse_util.flatten_dict(restored["params"], sep="/")
  for k, v in alone.items():
    np.testing.assert_array_equal(np.asarray(restored_flat[k]), np.asarray(v))
  # And it exports like a new one.
  from mcpf_jax import export  # pylint: disable=g-import-not-at-top
  out = export.export(work, tmp_path / "exported", checkpoint="latest", include_backbone=True)
  again = Scorer.from_pretrained(out["output"], batch_size=4)
  np.testing.assert_allclose([r.score for r in again.score([clive / n for n in expected["images"]])], got,
                             rtol=0, atol=1e-6)


def test_a_checkpoint_of_another_layout_is_refused_naming_what_was_expected(tmp_path):
  work = tmp_path / "odd"
  shutil.copytree(OLD, work)
  step_dir = work / "checkpoints" / "9"
  (step_dir / runs.OLD_STATE).rename(step_dir / "weights")
  with pytest.raises(ValueError, match=r"checkpoints/9: not a checkpoint of this project: expected an orbax item "
                                       r"'params' \(or 'state', layout 1, before params/opt/meta were saved apart\), "
                                       r"found .*'weights'"):
    Scorer.from_checkpoint(work, "latest")


def test_new_checkpoints_keep_parameters_apart_from_the_optimizer_state(tmp_path):
  """The layout written now: 'params' restores alone, without any optimizer (runs.read_params)."""
  from ml_collections import ConfigDict  # pylint: disable=g-import-not-at-top

  from mcpf_jax.model import freeze
  from mcpf_jax.train import checkpoints as ckpt_lib  # pylint: disable=g-import-not-at-top
  from mcpf_jax.train import optim
  from mcpf_jax.train import step as step_lib
  params = {"prompts": jnp.full((2, 3), 1.5), "clip": {"w": jnp.arange(4.0)}}
  mask = freeze.mask(params, "prompts")
  tx = optim.make_optimizer(ConfigDict(dict(lr=1e-2, warmup_steps=0, total_steps=10, final_lr_fraction=0.0,
                                            weight_decay=0.0, b1=0.9, b2=0.999, grad_clip_norm=0.0)), mask)
  ckpts = ckpt_lib.Checkpoints(tmp_path / "ck")
  ckpts.save(3, step_lib.init_state(params, tx), mask, None, {"dataset": "x"})
  ckpts.wait()
  ckpts.close()
  step_dir = tmp_path / "ck" / "3"
  assert {runs.PARAMS, runs.OPT, runs.META} <= {p.name for p in step_dir.iterdir()}
  assert runs.layout(step_dir) == runs.LAYOUT and runs.read_meta(step_dir)["layout"] == runs.LAYOUT
  alone = runs.read_params(step_dir)
  assert list(alone) == ["prompts"]  # the trainable leaves only: no backbone, no optimizer state
  np.testing.assert_array_equal(np.asarray(alone["prompts"]), np.full((2, 3), 1.5))


def test_export_of_a_vit_b16_model_is_a_few_mb(tmp_path):
  """The folder's weights for MCPF on ViT-B/16, from the shapes of the real model (no CLIP weights needed)."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top

  from configs import base  # pylint: disable=g-import-not-at-top
  from mcpf_jax.clip import config as clip_config  # pylint: disable=g-import-not-at-top
  from mcpf_jax.model.iqa import IQAModel, ModelSpec  # pylint: disable=g-import-not-at-top
  config = base.get_config()
  cc = clip_config.PRESETS["vit-b-16"]
  spec = ModelSpec.from_config(config.model, num_layers=cc.text.num_hidden_layers)
  ids = tuple((s, ((0,) * cc.text.max_position_embeddings,) * len(spec.class_phrases(s))) for s in spec.class_sets)
  shapes = jax.eval_shape(IQAModel(cc, spec, ids).init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))["params"]
  flat = traverse_util.flatten_dict(shapes, sep="/")
  own = {k: np.zeros(v.shape, v.dtype) for k, v in flat.items() if not k.startswith("clip/")}
  backbone = sum(int(np.prod(v.shape)) for k, v in flat.items() if k.startswith("clip/"))
  pretrained.write_params(tmp_path / "model.safetensors", own)
  size = (tmp_path / "model.safetensors").stat().st_size
  print(f"ViT-B/16 MCPF export: model.safetensors {size / 2**20:.1f} MiB for {sum(v.size for v in own.values()):,} "
        f"parameters; the backbone would add {4 * backbone / 2**20:.0f} MiB")
  assert sum(v.size for v in own.values()) == 4_248_576  # README: MCPF on ViT-B/16 trains 4,248,576 parameters
  assert size < 20 * 2**20 and size < 0.03 * 4 * backbone


def test_scoring_and_export_import_nothing_of_train():
  """scoring.py depends on the model, CLIP, image and score code only (so does the exporter)."""
  code = ("import sys; import mcpf_jax.scoring, mcpf_jax.export\n"
          "bad = sorted(m for m in sys.modules if m.startswith('mcpf_jax.train') or m.startswith('mcpf_jax.data'))\n"
          "print(bad); sys.exit(1 if bad else 0)\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
