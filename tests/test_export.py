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

from mcpf_jax import images, pretrained, resolve, runs
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
  score_fn = jax.jit(scorer.score_fn)  # one program per input type (uint8 crops, float pixels), not op by op
  per_crop = np.asarray(score_fn(crops))
  assert per_crop.shape == (9,) and np.ptp(per_crop) > 0
  (result,) = scorer.score(img)
  assert per_crop.mean() == pytest.approx(result.score, rel=1e-6, abs=1e-6)
  from mcpf_jax.clip import preprocess  # pylint: disable=g-import-not-at-top
  x = preprocess.normalize(crops[:2])  # normalised float pixels, the differentiable input
  np.testing.assert_allclose(np.asarray(score_fn(x)), per_crop[:2], rtol=1e-6)
  loss = lambda x: float(np.sum(np.asarray(score_fn(x), np.float64)))  # the float program compiled just above
  # Jitted: the same gradient (9e-7 relative to the op-by-op one), 3 s instead of 9 s on 2 CPU cores.
  grad = np.asarray(jax.jit(jax.grad(lambda x: jnp.sum(scorer.score_fn(x))))(x), np.float64)
  assert np.abs(grad).max() > 0
  rng = np.random.default_rng(0)
  for _ in range(3):  # directional derivatives: central differences against <grad, direction>
    d = rng.standard_normal(x.shape).astype(np.float32)
    d /= np.linalg.norm(d)
    eps = 1e-2
    fd = (loss(x + eps * d) - loss(x - eps * d)) / (2 * eps)
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
  from mcpf_jax.train import optim
  from mcpf_jax.train import step as step_lib
  config = resolve.saved_config(runs.read_run(work), {})
  _, params = iqa.build(config.model, runs.load_clip(config, work), jax.random.key(config.seed))
  mask = freeze.mask(params, config.model.trainable)
  state = step_lib.init_state(params, optim.make_optimizer(resolve.optim_config(config, 9), mask))
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
  """scoring/ depends on the model, CLIP, image and score code only (so does the exporter)."""
  code = ("import sys; import mcpf_jax.scoring, mcpf_jax.export\n"
          "bad = sorted(m for m in sys.modules if m.startswith('mcpf_jax.train') or m.startswith('mcpf_jax.data'))\n"
          "print(bad); sys.exit(1 if bad else 0)\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------------
# An exported folder is safe to publish: no path of the exporting machine in any file, ordinary file modes, a quiet
# export, and a backbone found from its own reference (relative when included, hub id + fingerprint otherwise).
# The run is a copy of the layout-1 fixture (its run.json records its dataset at a local /tmp path).

TINY_HUB_ID, TINY_COMMIT = "mcpf-tests/tiny-clip", "89abcdef0123456789abcdef0123456789abcdef"


def _export_cli(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
  """python -m mcpf_jax.export under umask 022 (the common default), output kept for the warning check."""
  proc = subprocess.run([sys.executable, "-m", "mcpf_jax.export"] + argv, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600, umask=0o022)
  assert proc.returncode == 0, f"{argv} exited with {proc.returncode}:\n{proc.stderr[-4000:]}"
  return proc


@pytest.fixture(scope="module")
def published(tmp_path_factory, clive):
  """The fixture run exported with its backbone, without it, and without it but from a hub cache's snapshot; the
  run's scores; then the run deleted."""
  root = tmp_path_factory.mktemp("publish")
  work = root / "run"
  shutil.copytree(OLD, work)
  env = _env(root)
  procs = {"full": _export_cli(["--workdir", str(work), "--checkpoint", "latest", "--output", str(root / "full"),
                                "--include_backbone"], env)}
  procs["small"] = _export_cli(["--workdir", str(work), "--checkpoint", "latest", "--output", str(root / "small")],
                               env)
  # The run's backbone as a snapshot of a Hugging Face cache, given with --clip: the export names it by hub id.
  cache = root / "cache"
  _place_in_hub_cache(work / "tiny_clip", cache, TINY_HUB_ID, TINY_COMMIT)
  snapshot = cache / ("models--" + TINY_HUB_ID.replace("/", "--")) / "snapshots" / TINY_COMMIT
  procs["cached"] = _export_cli(["--workdir", str(work), "--checkpoint", "latest", "--output", str(root / "cached"),
                                 "--clip", str(snapshot)], env)
  imgs = [str(p) for p in sorted(clive.glob("*.JPG"))[:6]]
  scores = [r.score for r in Scorer.from_checkpoint(work, "latest", batch_size=4).score(imgs)]
  tiny_clip = root / "tiny_clip_copy"
  shutil.copytree(work / "tiny_clip", tiny_clip)
  shutil.rmtree(work)
  return {"root": root, "work": work, "env": env, "procs": procs, "imgs": imgs, "scores": scores,
          "tiny_clip": tiny_clip, "cache": cache, **{k: root / k for k in procs}}


def _score_cli(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "score.py", "--format", "json", "--no_progress"] + argv, cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def _json_scores(proc: subprocess.CompletedProcess, imgs: list[str]) -> tuple[dict, list[float]]:
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout)
  by_path = {r["path"]: r["score"] for r in out["results"]}
  return out["scorer"], [by_path[p] for p in imgs]


def test_no_exported_file_holds_a_path_of_the_exporting_machine(published):
  import tempfile  # pylint: disable=g-import-not-at-top
  assert "/tmp/wt16_data" in (OLD / "run.json").read_text()  # the run does record a local path (its dataset's)
  needles = {str(published["work"]), str(published["root"]), str(published["cache"]), str(REPO), "/tmp/wt16_data",
             str(pathlib.Path.home()) + "/", tempfile.gettempdir().rstrip("/") + "/"}
  needles |= {os.path.realpath(n) for n in needles}
  checked = 0
  for name in ("full", "small", "cached"):
    for path in sorted(p for p in published[name].rglob("*") if p.is_file()):
      data = path.read_bytes()  # every file, the safetensors weights too
      found = sorted(n for n in needles if n.encode() in data)
      assert not found, f"{path.relative_to(published['root'])} holds {found}"
      checked += 1
  assert checked == 9 + 3 + 3
  for name in ("full", "small", "cached"):
    config = pretrained.read_config(published[name])
    assert "source" not in config["backbone"] and config["training"]["dataset"]["name"] == "smoke"
    assert "path" not in config["training"]["dataset"]
  assert pretrained.read_config(published["full"])["backbone"]["path"] == "clip"


def test_every_exported_file_has_the_ordinary_mode(published):
  for name in ("full", "small", "cached"):
    for path in sorted(published[name].rglob("*")):
      want = 0o755 if path.is_dir() else 0o644  # under umask 022, like any file the user writes
      assert path.stat().st_mode & 0o777 == want, f"{path}: mode {oct(path.stat().st_mode & 0o777)}"


def test_export_prints_no_orbax_warnings(published):
  for name, proc in published["procs"].items():
    lines = (proc.stdout + proc.stderr).splitlines()
    noisy = [ln for ln in lines if any(w in ln for w in ("absl", "orbax", "read only", "Metadata file", "could not "
                                                                                                      "be restored"))]
    assert not noisy, f"export ({name}) printed: {noisy}"
    assert json.loads(proc.stdout.strip().splitlines()[-1])["output"] == str(published[name])


def test_reading_checkpoints_of_either_layout_logs_no_orbax_warning(tmp_path, caplog):
  """The read-only view of a run and read_params on both layouts (the new one with a data iterator's item, as
  training saves it), with absl's warnings captured in-process."""
  import grain  # pylint: disable=g-import-not-at-top
  from ml_collections import ConfigDict  # pylint: disable=g-import-not-at-top

  from mcpf_jax.model import freeze  # pylint: disable=g-import-not-at-top
  from mcpf_jax.train import checkpoints as ckpt_lib  # pylint: disable=g-import-not-at-top
  from mcpf_jax.train import optim
  from mcpf_jax.train import step as step_lib
  params = {"prompts": jnp.full((2, 3), 1.5), "clip": {"w": jnp.arange(4.0)}}
  mask = freeze.mask(params, "prompts")
  tx = optim.make_optimizer(ConfigDict(dict(lr=1e-2, warmup_steps=0, total_steps=10, final_lr_fraction=0.0,
                                            weight_decay=0.0, b1=0.9, b2=0.999, grad_clip_norm=0.0)), mask)
  ckpts = ckpt_lib.Checkpoints(tmp_path / "ck")
  iterator = iter(grain.MapDataset.range(4).to_iter_dataset())
  next(iterator)
  ckpts.save(3, step_lib.init_state(params, tx), mask, iterator, {"dataset": "x"}, {"val_srcc": 0.5})
  ckpts.wait()
  ckpts.close()
  caplog.set_level("WARNING")
  caplog.clear()
  assert {"params", "opt", "meta", "metrics", "data"} <= {p.name for p in (tmp_path / "ck" / "3").iterdir()}
  for checkpoints, step in ((tmp_path / "ck", 3), (OLD / "checkpoints", 9)):
    with runs.ReadOnlyCheckpoints(checkpoints) as view:
      assert view.best_step() == step
    assert runs.read_params(checkpoints / str(step))
  assert not [r.getMessage() for r in caplog.records if r.levelno >= 30], caplog.text


def test_a_folder_with_its_backbone_loads_offline_from_its_relative_reference(published, tmp_path):
  moved = tmp_path / "elsewhere" / "model"  # the folder as a user gets it: somewhere else, alone
  shutil.copytree(published["full"], moved)
  env = _env(tmp_path)  # offline, an empty Hugging Face cache
  info, scores = _json_scores(_score_cli(["--pretrained", str(moved)] + published["imgs"], env), published["imgs"])
  assert info["backbone"] == str((moved / "clip" / "model.safetensors").resolve())
  assert max(abs(a - b) for a, b in zip(scores, published["scores"])) <= 1e-6
  assert np.ptp(scores) > 1e-3


def test_a_folder_without_its_backbone_names_the_fingerprint_and_the_command(published, tmp_path):
  small, env = published["small"], _env(tmp_path)
  fingerprint = pretrained.read_config(small)["backbone"]["fingerprint"]
  proc = _score_cli(["--pretrained", str(small), published["imgs"][0]], env)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert f"fingerprint {fingerprint}" in proc.stderr and "generated backbone 'tiny': the tiny_clip/" in proc.stderr
  assert f"python score.py --pretrained {small} --clip CLIP_FOLDER" in proc.stderr
  assert "--include_backbone" in proc.stderr
  # The command it names works, and the backbone given is checked against the recorded fingerprint.
  _, scores = _json_scores(_score_cli(["--pretrained", str(small), "--clip", str(published["tiny_clip"])]
                                      + published["imgs"], env), published["imgs"])
  assert max(abs(a - b) for a, b in zip(scores, published["scores"])) <= 1e-6
  run_clip = runs.read_run(OLD)["config"]["clip"]
  other = backbone.write(tmp_path / "other_clip", seed=run_clip["tiny_seed"] + 1, **run_clip["tiny"])
  wrong = _score_cli(["--pretrained", str(small), "--clip", str(other), published["imgs"][0]], env)
  assert wrong.returncode == 1 and f"(fingerprint {fingerprint}), but the backbone found" in wrong.stderr, wrong.stderr


def test_a_folder_whose_backbone_is_in_the_hub_cache_finds_it_offline(published, tmp_path):
  cached = published["cached"]
  ref = pretrained.read_config(cached)["backbone"]
  assert (ref["hub_id"], ref["revision"], ref["included"], ref["path"]) == (TINY_HUB_ID, TINY_COMMIT, False, None)
  env = dict(_env(tmp_path), HF_HUB_CACHE=str(published["cache"]))
  info, scores = _json_scores(_score_cli(["--pretrained", str(cached)] + published["imgs"], env), published["imgs"])
  assert info["backbone"] == f"hf://{TINY_HUB_ID}@{TINY_COMMIT}"
  assert max(abs(a - b) for a, b in zip(scores, published["scores"])) <= 1e-6
  # Not in this cache: the same usage error, naming the hub id, its revision and the fingerprint.
  missing = _score_cli(["--pretrained", str(cached), published["imgs"][0]], _env(tmp_path))
  assert missing.returncode == 2
  assert f"{TINY_HUB_ID!r} (revision {TINY_COMMIT}) with fingerprint {ref['fingerprint']}" in missing.stderr


def test_a_folder_exported_before_the_relative_reference_still_loads(published, tmp_path):
  """The previous exporter's backbone record: the exporting machine's weight path in "source", no "path" (the
  backbone, when included, in clip/); the clip section named the run's clip.name. It loads as before."""
  imgs, fingerprint = published["imgs"][:2], pretrained.read_config(published["full"])["backbone"]["fingerprint"]
  for name, included in (("full", True), ("small", False)):
    old = tmp_path / name
    shutil.copytree(published[name], old)
    config = json.loads((old / "config.json").read_text())
    assert config["format_version"] == 1
    config["backbone"] = {"source": "/home/someone/runs/smoke/tiny_clip/model.safetensors", "hub_id": None,
                          "revision": None, "fingerprint": fingerprint, "included": included}
    (old / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    clip_name = None if included else published["tiny_clip"]
    scorer = Scorer.from_pretrained(old, clip_name=clip_name, batch_size=4)
    got = [r.score for r in scorer.score(imgs)]
    assert max(abs(a - b) for a, b in zip(got, published["scores"])) <= 1e-6
    if not included:
      with pytest.raises(pretrained.MissingBackbone, match=rf"fingerprint {fingerprint}.*--clip CLIP_FOLDER"):
        Scorer.from_pretrained(old)


def test_a_backbone_path_outside_the_folder_or_missing_is_refused_naming_the_field(published, tmp_path):
  folder = tmp_path / "model"
  shutil.copytree(published["full"], folder)
  config = json.loads((folder / "config.json").read_text())
  for bad in ("../elsewhere", "/abs/clip", ""):
    (folder / "config.json").write_text(json.dumps(dict(config, backbone=dict(config["backbone"], path=bad))))
    with pytest.raises(ValueError, match=r"config.json: field backbone.path is .*, expected a folder inside"):
      Scorer.from_pretrained(folder)
  (folder / "config.json").write_text(json.dumps(dict(config, backbone=dict(config["backbone"], path="weights"))))
  with pytest.raises(FileNotFoundError, match=r"backbone.path is 'weights', but .*weights is not a folder"):
    Scorer.from_pretrained(folder)
