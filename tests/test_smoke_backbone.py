"""The smoke CLIP's pre-trained vision tower (mcpf_jax.smoke.backbone, .pretrain): data, training, the file.

The claim behind the bundled tower is measured here on the real smoke photos: a ridge read-out of its frozen image
features ranks the distortion levels of photos it never saw far better than the same read-out of the random tower
it started from (smoke photos were never part of its pre-training: it saw only dead-leaves images).
"""

import itertools
import json

import numpy as np
import pytest
import scipy.stats
import transformers
from safetensors import safe_open

from mcpf_jax import clip
from mcpf_jax.clip import tiny
from mcpf_jax.clip.preprocess import normalize
from mcpf_jax.smoke import backbone, pretrain
from mcpf_jax.smoke import data as smoke


def _gradient_energy(img: np.ndarray) -> float:
  return float(np.mean(np.abs(np.diff(img.astype(np.float64).mean(-1), axis=1))))


def test_dead_leaves_images_are_deterministic_filled_and_varied():
  a = pretrain.dead_leaves(np.random.default_rng(7), 96)
  b = pretrain.dead_leaves(np.random.default_rng(7), 96)
  c = pretrain.dead_leaves(np.random.default_rng(8), 96)
  assert a.dtype == np.uint8 and a.shape == (96, 96, 3)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # Occluding discs at many scales: edges everywhere, many distinct colours, no empty (black) canvas left over.
  assert len(np.unique(a.reshape(-1, 3), axis=0)) > 500
  assert _gradient_energy(a) > 2.0
  assert np.mean(a.max(-1) == 0) < 0.01


def test_distorted_versions_follow_the_smoke_levels():
  img = pretrain.dead_leaves(np.random.default_rng(0), 64)
  versions = pretrain.distorted_versions(img, seed=3)
  assert len(versions) == 1 + 3 * smoke.NUM_LEVELS
  np.testing.assert_array_equal(versions[0][0], img)
  assert [m for _, m in versions] == [smoke.mos_of_level(0)] + [smoke.mos_of_level(k) for k in range(1, 6)
                                                                 for _ in range(3)]
  blurred = [versions[1 + 3 * k][0] for k in range(5)]
  noisy = [versions[2 + 3 * k][0] for k in range(5)]
  sharp = [_gradient_energy(x) for x in blurred]
  assert sharp == sorted(sharp, reverse=True) and sharp[-1] < 0.5 * _gradient_energy(img)
  spread = [np.std(x.astype(np.float64) - img) for x in noisy]
  assert spread == sorted(spread) and spread[-1] > 30
  np.testing.assert_array_equal(blurred[2], smoke.blur(img, smoke.BLUR_SIGMAS[2]))


def test_pretraining_set_does_not_depend_on_the_number_of_workers():
  one, mos_one = pretrain.pretraining_set(3, 64, data_seed=5, workers=1)
  two, mos_two = pretrain.pretraining_set(3, 64, data_seed=5, workers=2)
  assert one.shape == (48, 64, 64, 3) and mos_one.shape == (48,)
  np.testing.assert_array_equal(one, two)
  np.testing.assert_array_equal(mos_one, mos_two)


def test_pretrain_learns_and_touches_only_the_vision_tower():
  config = tiny.tiny_config(width=32, layers=2, heads=2, image_size=32, patch_size=8, embed_dim=32)
  params = tiny.perturbed_params(config, 1)
  images, mos = pretrain.pretraining_set(2, 40, data_seed=1, workers=1)
  out, losses = pretrain.pretrain(config, params, images, mos, steps=300, batch_size=32, lr=3e-3,
                                       warmup_steps=10, log_every=0)
  assert len(losses) == 300 and all(np.isfinite(losses))
  assert np.mean(losses[-50:]) < 0.75 * np.mean(losses[:50]), (np.mean(losses[:50]), np.mean(losses[-50:]))
  flat_in = clip.fingerprint({k: params[k] for k in ("text_model", "text_projection", "logit_scale")})
  flat_out = clip.fingerprint({k: out[k] for k in ("text_model", "text_projection", "logit_scale")})
  assert flat_in == flat_out
  assert clip.fingerprint(out["vision_model"]) != clip.fingerprint(params["vision_model"])


def test_save_and_load_tower_round_trip_and_errors(tmp_path):
  config = backbone.config()
  params = tiny.perturbed_params(config, 4)
  path = pretrain.save_tower(tmp_path / "tower.safetensors", params, {"note": "test"})
  back = tiny.load_vision_tower(path, config)
  assert clip.fingerprint(back) == clip.fingerprint({k: params[k] for k in tiny.VISION_TOWER})
  with safe_open(str(path), framework="numpy") as f:
    assert json.loads(f.metadata()["mcpf_recipe"]) == {"note": "test"}
    # transformers' CLIPModel names: the patch embedding is a torch Conv2d weight [out, in, kh, kw].
    assert f.get_tensor("vision_model.embeddings.patch_embedding.weight").shape == (64, 3, 8, 8)
  with pytest.raises(FileNotFoundError, match="nothere.safetensors"):
    tiny.load_vision_tower(tmp_path / "nothere.safetensors", config)
  other = tiny.tiny_config(width=32, layers=4, heads=4, image_size=64, patch_size=8, embed_dim=64)
  with pytest.raises(ValueError, match=r"tower\.safetensors.*(is \[|missing)"):
    tiny.load_vision_tower(path, other)


def test_bundled_tower_matches_its_recipe_and_goes_into_the_tiny_clip(tmp_path):
  path = backbone.tower_path("smoke")
  assert path == pretrain.ASSET and path.is_file()
  with safe_open(str(path), framework="numpy") as f:
    meta = json.loads(f.metadata()["mcpf_recipe"])
  assert meta["recipe"] == pretrain.RECIPE
  assert meta["config"] == backbone.config().to_hf()
  folder = backbone.write(tmp_path / "tiny", seed=backbone.SEED, vision_weights="smoke",
                                **backbone.SIZES)
  recipe = json.loads((folder / "mcpf_tiny.json").read_text())
  assert recipe["vision_weights"] == {"name": "smoke", "sha256": tiny.file_sha256(path)}
  bundle = clip.load(folder)
  tower = tiny.load_vision_tower(path, backbone.config())
  assert clip.fingerprint({k: bundle.params[k] for k in tiny.VISION_TOWER}) == clip.fingerprint(tower)
  random = tiny.perturbed_params(backbone.config(), backbone.SEED)
  assert clip.fingerprint(bundle.params["text_model"]) == clip.fingerprint(random["text_model"])
  # Still a real Hugging Face checkpoint: transformers loads every tensor, nothing missing or unexpected.
  model, info = transformers.CLIPModel.from_pretrained(folder, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
  np.testing.assert_array_equal(model.vision_model.embeddings.patch_embedding.weight.detach().numpy(),
                                np.asarray(tower["vision_model"]["embeddings"]["patch_embedding"]["kernel"])
                                .transpose(3, 2, 0, 1))


@pytest.fixture(scope="module")
def smoke_photos(tmp_path_factory):
  folder = tmp_path_factory.mktemp("smoke_photos")
  smoke.write_smoke_dataset(folder)
  return folder


def _features(bundle, folder) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Mean image feature over a 3x3 grid of 64-px crops of every smoke image; MOS; photo."""
  import csv  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top

  from mcpf_jax import images  # pylint: disable=g-import-not-at-top
  with open(folder / smoke.CSV_NAME, newline="") as f:
    rows = list(csv.DictReader(f))
  crops = []
  for r in rows:
    img = images.load(folder / r["path"])
    h, w = img.shape[:2]
    crops += [img[y:y + 64, x:x + 64] for y in np.linspace(0, h - 64, 3).astype(int)
              for x in np.linspace(0, w - 64, 3).astype(int)]
  encode = jax.jit(lambda p, x: bundle.model.apply({"params": p}, normalize(x), method=bundle.model.encode_image))
  feats = np.asarray(encode(bundle.params, np.stack(crops))).reshape(len(rows), 9, -1).mean(1)
  return (feats / np.linalg.norm(feats, axis=-1, keepdims=True), np.array([float(r["mos"]) for r in rows]),
          np.array([r["content_id"] for r in rows]))


def _held_out_srcc(feats, mos, photo) -> float:
  """Median held-out SRCC of a ridge read-out over all 66 ways to hold out two of the 12 photos."""
  out = []
  for pair in itertools.combinations(sorted(set(photo)), 2):
    test = np.isin(photo, pair)
    mu, sd = feats[~test].mean(0), feats[~test].std(0) + 1e-8
    a, b = (feats[~test] - mu) / sd, (feats[test] - mu) / sd
    w = np.linalg.solve(a.T @ a + np.eye(a.shape[1]), a.T @ (mos[~test] - mos[~test].mean()))
    out.append(scipy.stats.spearmanr(b @ w, mos[test])[0])
  return float(np.median(out))


@pytest.mark.slow
def test_bundled_tower_sees_quality_on_photos_it_never_saw(tmp_path, smoke_photos):
  pretrained = clip.load(backbone.write(tmp_path / "pre", vision_weights="smoke", **backbone.SIZES))
  random = clip.load(tiny.write_tiny_clip(tmp_path / "random", **backbone.SIZES))
  srcc_pre = _held_out_srcc(*_features(pretrained, smoke_photos))
  srcc_random = _held_out_srcc(*_features(random, smoke_photos))
  assert srcc_pre >= 0.75, (srcc_pre, srcc_random)
  assert srcc_pre > srcc_random + 0.3, (srcc_pre, srcc_random)
