"""Scoring users' images (mcpf_jax.scoring, score.py): a trained smoke checkpoint and zero-shot CLIP-IQA.

The checkpoint scorer must reproduce the training run's own test evaluation; the zero-shot scorer must match
transformers' CLIPModel + CLIP image processor (an independent implementation). Every kind of input file is
either scored (the same score as its pixels given as an array, decoded independently here) or reported.
"""

import copy
import csv
import dataclasses
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tracemalloc

import jax
import numpy as np
import pytest
from PIL import Image, ImageDraw

import score as score_cli
from mcpf_jax import metrics
from mcpf_jax.clip.tiny import write_tiny_clip
from mcpf_jax.scoring import Scorer, find_images, loaders

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(width=32, layers=2, heads=4, image_size=32, patch_size=8, embed_dim=32)


def _photo(h: int, w: int, seed: int) -> np.ndarray:
  """A smooth, asymmetric uint8 [h, w, 3] test picture (random low-res colours, upsampled)."""
  rng = np.random.default_rng(seed)
  small = Image.fromarray(rng.integers(0, 256, (6, 9, 3), dtype=np.uint8))
  return np.asarray(small.resize((w, h), Image.Resampling.BILINEAR))


def _png(path: pathlib.Path, img: np.ndarray | Image.Image) -> pathlib.Path:
  (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(path)
  return path


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: a briefly trained smoke run, and zero-shot scorers on a tiny CLIP folder.


@pytest.fixture(scope="module")
def run(smoke_run):
  """The session's smoke run (conftest.py): one epoch, a checkpoint every 2 steps (and at the end). Read only."""
  return smoke_run.workdir, smoke_run.config, smoke_run.summary


@pytest.fixture(scope="module")
def scorer(run, tmp_path_factory):
  """The run's latest checkpoint, restored from a copy of checkpoints/ alone: no dataset, no CLIP folder."""
  deployed = tmp_path_factory.mktemp("deployed")
  shutil.copytree(run[0] / "checkpoints", deployed / "checkpoints")
  return Scorer.from_checkpoint(deployed, "latest", batch_size=4, num_workers=2)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
  return write_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=5, **TINY)


@pytest.fixture(scope="module")
def zero_shot(tiny_clip):
  """Zero-shot scorer: 4 crops of 32 after resizing the short side to 48."""
  return Scorer.zero_shot(tiny_clip, batch_size=4, num_crops=4, resize=48, num_workers=2)


def _score(scorer: Scorer, item) -> float:
  (r,) = scorer.score(item)
  assert r.ok, r.error
  return r.score


# ---------------------------------------------------------------------------------------------------------------
# The checkpoint scorer.


def test_checkpoint_scores_reproduce_the_runs_test_evaluation(run, scorer):
  from mcpf_jax.train import data_setup  # pylint: disable=g-import-not-at-top
  workdir, config, summary = run
  data = data_setup.load(config, workdir)
  test = data.indices["test"]
  paths = [workdir / "data" / "smoke_release" / data.names[i] for i in test]
  results = scorer.score(paths)
  assert all(r.ok for r in results), [r.error for r in results if not r.ok]
  pred = np.array([r.score for r in results])
  ours = metrics.evaluate(pred, data.mos[test], higher_is_better=True)
  for key in ("srcc", "plcc", "rmse"):
    assert ours[key] == pytest.approx(summary["test"][key], abs=1e-5), key
  assert scorer.info["step"] == summary["step"] and scorer.info["trained_on"] == "smoke"
  assert scorer.info["num_crops"] == config.eval.num_crops and scorer.info["resize"] == config.data.resize
  assert scorer.info["higher_is_better"] and len(set(np.round(pred, 6))) > 1


def test_score_does_not_depend_on_the_batch(scorer, run, tmp_path):
  release = run[0] / "data" / "smoke_release" / "images"
  folder = tmp_path / "folder"
  folder.mkdir()
  names = sorted(os.listdir(release))[:9]
  for n in names:
    shutil.copy(release / n, folder / n)
  _png(folder / "zz_wide.png", _photo(300, 700, 1))
  (folder / "bad.jpg").write_bytes(b"not a jpeg")  # an error row between them shifts batch positions
  paths = find_images([folder])
  target = folder / names[5]
  alone = _score(scorer, target)
  results = scorer.score(paths)
  assert [r.path for r in results] == paths
  in_folder = results[paths.index(str(target))].score
  assert abs(alone - in_folder) <= 1e-5, (alone, in_folder)
  # Other neighbours and another position in the batch.
  reordered = scorer.score([str(target)] + paths[::-1])
  assert abs(reordered[0].score - alone) <= 1e-5
  assert abs(reordered[1 + paths[::-1].index(str(target))].score - alone) <= 1e-5
  scores = [r.score for r in results if r.ok]
  assert len(scores) == 10 and np.ptp(scores) > 1e-4  # the images really differ


def test_a_scanned_run_scores_alike_and_exports_unrolled(scorer):
  """A run trained with clip.scan_layers (a layout of the same weights) scores like the unrolled stack, and its
  portable function (what export turns into model.stablehlo / model.onnx) holds no loop over the layers."""
  mc = scorer._model  # pylint: disable=protected-access
  scanned = Scorer(loaders.LoadedModel(mc.clone(clip_config=mc.clip_config.replace(scan_layers=True)),
                                       scorer.params, scorer.preprocessing, {}, scorer.score_map), batch_size=4)
  prep = scorer.preprocessing
  crops = np.random.default_rng(0).integers(0, 256, (3, prep.num_crops, prep.image_size, prep.image_size, 3),
                                            np.uint8)

  def scans(fn) -> int:
    return str(jax.make_jaxpr(fn)(crops)).count(" scan[")

  assert scans(scanned.crops_fn()) > scans(scorer.crops_fn())  # the layer stacks really are scanned there
  assert scans(scanned.crops_fn(portable=True)) == 0
  want = np.asarray(scorer.crops_fn()(crops))
  for fn in (scanned.crops_fn(), scanned.crops_fn(portable=True)):
    np.testing.assert_allclose(np.asarray(fn(crops)), want, rtol=1e-5, atol=1e-6)


def test_level_probabilities_give_the_score(scorer, zero_shot, run, tmp_path):
  """Result.levels: the quality classes' probabilities (mean over crops), whose expected level is the score."""
  release = run[0] / "data" / "smoke_release" / "images"
  paths = [str(p) for p in sorted(release.iterdir())[:3]] + [str(tmp_path / "missing.jpg")]
  results = scorer.score(paths)
  assert scorer.level_names == ("bad", "poor", "fair", "good", "perfect")
  assert results[-1].levels is None and not results[-1].ok
  for r in results[:-1]:
    p = np.array(r.levels)
    assert p.shape == (5,) and np.all(p >= 0) and abs(p.sum() - 1) < 1e-5
    score01 = (p @ np.arange(1, 6) - 1) / 4
    assert float(scorer.score_map.to_mos(score01)) == pytest.approx(r.score, abs=1e-4), (r.levels, r.score)
  assert len({r.levels for r in results[:-1]}) == 3
  (r,) = zero_shot.score(_photo(60, 80, 3))
  assert zero_shot.level_names == ("Bad photo.", "Good photo.")
  assert r.levels[1] == pytest.approx(r.score, abs=1e-6)  # zero-shot: the score is p("Good photo.")


def test_checkpoint_errors(run, tiny_clip, tmp_path):
  steps = run[2]["checkpoints"]
  assert len(steps) >= 2
  with pytest.raises(FileNotFoundError, match=re.escape(f"no checkpoint {steps[-1] + 1} (found steps {steps})")):
    Scorer.from_checkpoint(run[0], steps[-1] + 1)
  with pytest.raises(FileNotFoundError, match="not a training run"):
    Scorer.from_checkpoint(tmp_path)
  with pytest.raises(ValueError, match="fingerprint"):  # another backbone than the one trained on
    Scorer.from_checkpoint(run[0] / "checkpoints" / str(steps[0]), clip_name=str(tiny_clip))


# ---------------------------------------------------------------------------------------------------------------
# Zero-shot.


def test_zero_shot_matches_transformers(tiny_clip, tmp_path):
  """One centre crop after a short-side resize is CLIP's own preprocessing: compare with transformers."""
  torch = pytest.importorskip("torch")
  import transformers  # pylint: disable=g-import-not-at-top
  files = [_png(tmp_path / "a.png", _photo(80, 120, 2)), _png(tmp_path / "b.png", _photo(100, 70, 3))]
  scorer = Scorer.zero_shot(tiny_clip, batch_size=2, num_crops=1, resize=32, num_workers=0)
  ours = [r.score for r in scorer.score(files)]
  processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
  pixels = processor(images=[Image.open(f).convert("RGB") for f in files], return_tensors="np")["pixel_values"]
  tok = transformers.CLIPTokenizer.from_pretrained(tiny_clip)
  text = tok(["Bad photo.", "Good photo."], padding=True, return_tensors="pt")
  ref = transformers.CLIPModel.from_pretrained(tiny_clip).eval()
  with torch.no_grad():
    logits = ref(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                 pixel_values=torch.from_numpy(pixels)).logits_per_image
  theirs = torch.softmax(logits, dim=-1)[:, 1].numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-5)
  assert scorer.info["model"] == "clipiqa" and min(ours) > 0 and max(ours) < 1


# ---------------------------------------------------------------------------------------------------------------
# Every kind of input.


def test_every_pixel_format_is_scored_as_its_pixels(zero_shot, tmp_path):
  """Each file's score equals the score of its RGB pixels decoded independently (numpy, not mcpf_jax)."""
  rgb = _photo(90, 130, 4)
  grey = rgb[..., 1]
  cases = {}  # file -> expected uint8 [h, w, 3]
  cases[_png(tmp_path / "grey.png", grey)] = np.repeat(grey[..., None], 3, -1)
  pal = Image.fromarray(rgb).quantize(colors=16)
  lut = np.asarray(pal.getpalette(), np.uint8).reshape(-1, 3)
  cases[_png(tmp_path / "palette.png", pal)] = lut[np.asarray(pal)]
  alpha = np.linspace(0, 255, rgb.shape[1]).astype(np.uint8)[None, :].repeat(rgb.shape[0], 0)
  on_white = np.round(rgb * (alpha[..., None] / 255.0) + 255 * (1 - alpha[..., None] / 255.0)).astype(np.uint8)
  cases[_png(tmp_path / "rgba.png", np.dstack([rgb, alpha]))] = on_white
  grey16 = (grey.astype(np.uint16) * 257 + np.arange(grey.size, dtype=np.uint16).reshape(grey.shape) % 200)
  Image.fromarray(grey16).save(tmp_path / "grey16.png")
  assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
  cases[tmp_path / "grey16.png"] = np.repeat(np.round(grey16 / 257.0).astype(np.uint8)[..., None], 3, -1)
  # EXIF orientation 6: the stored pixels are shown turned 90 degrees clockwise.
  stored = np.ascontiguousarray(np.rot90(rgb, 1))
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(stored).save(tmp_path / "rotated.jpg", quality=95, exif=exif.tobytes())
  raw = np.asarray(Image.open(tmp_path / "rotated.jpg").convert("RGB"))  # PIL's open does not rotate
  cases[tmp_path / "rotated.jpg"] = np.ascontiguousarray(np.rot90(raw, -1))
  Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
  assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
  cases[tmp_path / "cmyk.jpg"] = np.asarray(Image.open(tmp_path / "cmyk.jpg").convert("RGB"))
  tiny = _photo(12, 20, 5)  # smaller than a 32 crop: resized up
  cases[_png(tmp_path / "tiny.png", tiny)] = tiny

  files = list(cases)
  results = zero_shot.score(files)
  arrays = zero_shot.score(list(cases.values()))
  for f, r, a in zip(files, results, arrays):
    assert r.ok, r.error
    assert (r.height, r.width) == cases[f].shape[:2], f.name
    assert abs(r.score - a.score) <= 1e-6, f.name
  by_name = {pathlib.Path(r.path).name: r for r in results}
  assert (by_name["rotated.jpg"].width, by_name["rotated.jpg"].height) == (130, 90)
  # The orientation matters: the stored (unrotated) pixels score differently.
  assert abs(_score(zero_shot, stored) - by_name["rotated.jpg"].score) > 1e-4
  assert "upscaled 4.00x from 20x12" in by_name["tiny.png"].note
  assert by_name["grey.png"].note is None
  # A refusal instead of an upscale, on request.
  strict = copy.copy(zero_shot)
  strict.preprocessing = dataclasses.replace(zero_shot.preprocessing, max_upscale=2.0)
  (refused,) = strict.score(tmp_path / "tiny.png")
  assert not refused.ok and refused.score is None and "tiny.png" in refused.error
  assert "more than max_upscale=2.0 (pass max_upscale=None to allow it)" in refused.error  # the API's spelling
  assert (refused.width, refused.height) == (20, 12)  # the size is known when the upscale is refused
  assert (refused.refused.option, refused.refused.limit) == ("max_upscale", 2.0)
  assert refused.refused.needed == pytest.approx(48 / 12)


def test_very_large_image_memory_stays_bounded(zero_shot, tmp_path):
  big = Image.fromarray(_photo(40, 60, 6)).resize((6000, 4000), Image.Resampling.BILINEAR)
  big.save(tmp_path / "big.jpg", quality=90)
  decoded_bytes = 6000 * 4000 * 3
  one = copy.copy(zero_shot)
  one.num_workers = 1  # one decode at a time: peak memory is about one image, however many are queued
  one.score(np.zeros((40, 40, 3), np.uint8))  # compile outside the measurement
  tracemalloc.start()
  try:
    results = one.score([tmp_path / "big.jpg"] * 4)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert all(r.ok and (r.width, r.height) == (6000, 4000) for r in results), results
  assert len({r.score for r in results}) == 1
  # A decode briefly holds PIL's bytes and the array (2 copies); holding the 4 images would need 4.
  assert peak < 2.6 * decoded_bytes, f"peak {peak / 1e6:.0f} MB for 4 images of {decoded_bytes / 1e6:.0f} MB"


def test_unreadable_and_broken_files_get_error_rows(zero_shot, tmp_path):
  good = _png(tmp_path / "good.png", _photo(60, 80, 7))
  (tmp_path / "empty.jpg").write_bytes(b"")
  buf = io.BytesIO()
  Image.fromarray(_photo(60, 80, 8)).save(buf, "JPEG")
  (tmp_path / "truncated.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
  (tmp_path / "notes.jpg").write_text("these are notes, not a photo")
  (tmp_path / "folder.jpg").mkdir()
  os.symlink(tmp_path / "gone.png", tmp_path / "broken.png")
  good2 = _png(tmp_path / "good2.png", _photo(70, 50, 9))
  inputs = [good, tmp_path / "empty.jpg", tmp_path / "truncated.jpg", tmp_path / "notes.jpg",
            tmp_path / "folder.jpg", tmp_path / "broken.png", tmp_path / "missing.png", good2,
            np.zeros((10, 10, 3), np.float32)]
  expected = {"empty.jpg": "the file is empty", "truncated.jpg": "truncated", "notes.jpg": "not an image format",
              "folder.jpg": "Is a directory", "broken.png": "No such file", "missing.png": "No such file"}
  if os.geteuid() != 0:  # root reads files whatever their permissions
    locked = _png(tmp_path / "locked.png", _photo(20, 20, 10))
    locked.chmod(0)
    inputs.insert(1, locked)
    expected["locked.png"] = "Permission denied"
  results = zero_shot.score(inputs)
  assert [r.path for r in results[:-1]] == [str(p) for p in inputs[:-1]]
  by_name = {pathlib.Path(r.path).name: r for r in results}
  assert by_name["good.png"].ok and by_name["good2.png"].ok
  assert by_name["good.png"].score == pytest.approx(_score(zero_shot, good), abs=1e-6)
  for name, reason in expected.items():
    r = by_name[name]
    assert not r.ok and r.score is None and r.width is None, name
    assert name in r.error and reason in r.error, r.error
  assert results[-1].path == "<array 8>" and "expected a uint8 [height, width, 3]" in results[-1].error


def test_iter_score_reads_ahead_a_bounded_number_of_inputs(zero_shot):
  pulled = []

  def inputs():
    for i in range(30):
      pulled.append(i)
      yield _photo(40 + i, 50, 100 + i)

  results = []
  for r in zero_shot.iter_score(inputs()):
    results.append(r)
    assert len(pulled) - len(results) <= 3 * zero_shot.batch_size
  assert [r.path for r in results] == [f"<array {i}>" for i in range(30)]
  again = zero_shot.score([_photo(40 + i, 50, 100 + i) for i in (0, 17, 29)])
  for r, i in zip(again, (0, 17, 29)):
    assert abs(r.score - results[i].score) <= 1e-5


def test_find_images_order_and_extensions(tmp_path):
  (tmp_path / "b" / "c.JPG").mkdir(parents=True)  # a folder named like an image: searched, never scored
  for rel in ("a.png", "b/z.jpeg", "b/c.JPG/inner.webp", "b/a.TIF", "b/readme.txt", "b/data.csv"):
    (tmp_path / rel).write_bytes(b"x")
  os.symlink(tmp_path / "nowhere.bmp", tmp_path / "b" / "link.bmp")
  found = find_images([tmp_path / "b", tmp_path / "a.png", tmp_path / "b" / "z.jpeg", tmp_path / "x.txt"])
  rel = [os.path.relpath(p, tmp_path) for p in found]
  assert rel == ["b/a.TIF", "b/c.JPG/inner.webp", "b/link.bmp", "b/z.jpeg", "a.png", "x.txt"]


# ---------------------------------------------------------------------------------------------------------------
# score.py.


def test_cli_scores_a_folder_and_exits_1_on_a_bad_file(run, scorer, tmp_path):
  release = run[0] / "data" / "smoke_release" / "images"
  folder = tmp_path / "photos"
  (folder / "sub").mkdir(parents=True)
  shutil.copy(release / "camera_noise2.png", folder / "camera.png")
  shutil.copy(release / "coffee_jpeg3.jpg", folder / "sub" / "coffee.jpg")
  (folder / "sub" / "broken.jpg").write_bytes((release / "coffee_jpeg3.jpg").read_bytes()[:500])
  (folder / "notes.txt").write_text("skipped: not an image extension")
  out = tmp_path / "scores.csv"
  proc = subprocess.run([sys.executable, "score.py", "--workdir", str(run[0]), "--checkpoint", "latest",
                         "--output", str(out), str(folder)], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 1, proc.stderr
  assert "2 of 3 images scored, 1 failed" in proc.stderr
  rows = list(csv.DictReader(out.open()))
  assert list(rows[0]) == ["path", "score", "error", "width", "height", "note"]
  assert [os.path.relpath(r["path"], folder) for r in rows] == ["camera.png", "sub/broken.jpg", "sub/coffee.jpg"]
  api = scorer.score([folder / "camera.png", folder / "sub" / "coffee.jpg"])
  assert float(rows[0]["score"]) == pytest.approx(api[0].score, abs=1e-5)
  assert float(rows[2]["score"]) == pytest.approx(api[1].score, abs=1e-5)
  assert rows[1]["score"] == "" and "broken.jpg" in rows[1]["error"] and "truncated" in rows[1]["error"].lower()
  assert rows[0]["error"] == "" and rows[0]["width"] == "256"


def test_cli_prints_only_its_own_lines(run):
  """`python score.py --workdir RUN one.jpg` as a user types it, with no JAX_PLATFORMS (jax picks its backends): the
  CSV on stdout; on stderr the progress bar and score.py's summary, and nothing from libtpu or jax's backend
  probing (`E0000 ... INVALID_ARGUMENT ... TPU_WORKER_HOSTNAMES`, "Unable to initialize backend 'tpu'")."""
  photo = run[0] / "data" / "smoke_release" / "images" / "coffee_jpeg3.jpg"
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  proc = subprocess.run([sys.executable, "score.py", "--workdir", str(run[0]), str(photo)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  rows = list(csv.reader(io.StringIO(proc.stdout)))
  assert rows[0] == list(score_cli.COLUMNS) and len(rows) == 2 and rows[1][0] == str(photo) and rows[1][2] == ""
  lines = [line.strip() for line in re.split(r"[\r\n]+", proc.stderr) if line.strip()]
  foreign = [line for line in lines if not line.startswith(("score:", "score.py: "))]
  assert not foreign, proc.stderr
  assert lines[-1].startswith("score.py: 1 of 1 images scored, 0 failed"), proc.stderr


def test_cli_zero_shot_json_exits_0(tiny_clip, tmp_path, capsys):
  for i in range(3):
    _png(tmp_path / f"img{i}.png", _photo(50 + 10 * i, 60, 20 + i))
  out = tmp_path / "scores.json"
  code = score_cli.main(["--model", "clipiqa", "--clip", str(tiny_clip), "--num_crops", "2", "--batch_size", "2",
                         "--output", str(out), "--no_progress", str(tmp_path)])
  assert code == 0, capsys.readouterr().err
  doc = json.loads(out.read_text())
  assert doc["scorer"]["model"] == "clipiqa" and doc["scorer"]["num_crops"] == 2
  assert doc["summary"] == {"images": 3, "scored": 3, "failed": 0}
  assert [pathlib.Path(r["path"]).name for r in doc["results"]] == ["img0.png", "img1.png", "img2.png"]
  assert all(0 < r["score"] < 1 and r["error"] is None for r in doc["results"])


def test_cli_argument_and_setup_errors(tmp_path, capsys):
  img = _png(tmp_path / "a.png", _photo(40, 40, 30))
  os.symlink(tmp_path / "gone.png", tmp_path / "link.png")
  # --clip names no CLIP: had the model been loaded first, that would be the error (exit 1).
  zero_shot = ["--model", "clipiqa", "--clip", str(tmp_path / "no_clip")]
  for argv, message in ((["--output", "o.csv", str(img)], "give --pretrained"),
                        (["--workdir", "w", "--model", "clipiqa", str(img)], "give one of"),
                        (["--checkpoint", "latest", "--model", "clipiqa", "--clip", "x", str(img)],
                         "goes with --workdir"),
                        (["--model", "clipiqa", str(img)], "needs --clip"),
                        # Checked before the model is loaded: paths, folders and numbers.
                        (zero_shot + [str(img), str(tmp_path / "missing.jpg"), str(tmp_path / "link.png")],
                         f"no such file or folder: {tmp_path / 'missing.jpg'}, {tmp_path / 'link.png'} "
                         "(a broken link)"),
                        (["--workdir", str(tmp_path / "nowhere"), str(img)], "nowhere: no such folder"),
                        (zero_shot + ["--output", str(tmp_path / "no" / "o.csv"), str(img)],
                         f"the folder {tmp_path / 'no'} does not exist"),
                        (zero_shot + ["--output", str(tmp_path), str(img)], "is a folder: give a file name"),
                        (zero_shot + ["--batch_size", "0", str(img)], "--batch_size: 0 is not a whole number"),
                        (zero_shot + ["--max_pixels", "1e9", str(img)], "'1e9' is not a whole number"),
                        (zero_shot + ["--max_upscale", "-1", str(img)], "-1 is not a factor of at least 0"),
                        (zero_shot + ["--num_workers", "-1", str(img)], "-1 is not a whole number of at least 0")):
    with pytest.raises(SystemExit) as e:
      score_cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err, err
  (tmp_path / "empty").mkdir()
  assert score_cli.main(["--model", "clipiqa", "--clip", "x", str(tmp_path / "empty")]) == 1
  assert "no image files found" in capsys.readouterr().err
  assert score_cli.main(["--workdir", str(tmp_path / "empty"), str(img)]) == 1  # exists, but is no run
  assert "not a training run" in capsys.readouterr().err


def test_cli_refusals_advise_its_flags_and_keep_the_size(tiny_clip, tmp_path, capsys):
  """A refused image's row names the flag that allows it (not the Python argument) and keeps its size; a 200 MP
  JPEG, over PIL's own guard, is scored with --max_pixels (read at a reduced scale)."""
  _png(tmp_path / "small.png", _photo(12, 20, 40))  # 25.6x to a short side of 512 (zero-shot: 512)
  big = Image.new("RGB", (17000, 12000), (90, 140, 200))
  ImageDraw.Draw(big).rectangle([4000, 3000, 9000, 8000], fill=(200, 60, 30))
  big.save(tmp_path / "huge.jpg", quality=80)
  del big
  out = tmp_path / "scores.csv"
  base = ["--model", "clipiqa", "--clip", str(tiny_clip), "--num_crops", "2", "--no_progress", "--output", str(out)]
  assert score_cli.main(base + ["--max_upscale", "2", str(tmp_path)]) == 1
  err = capsys.readouterr().err
  rows = {pathlib.Path(r["path"]).name: r for r in csv.DictReader(out.open())}
  small, huge = rows["small.png"], rows["huge.jpg"]
  assert small["score"] == "" and (small["width"], small["height"]) == ("20", "12")
  assert small["error"] == (f"{tmp_path / 'small.png'}: a 20x12 image would be upscaled 42.67x to a short side of "
                            "512, more than --max_upscale 2.0 (pass --max_upscale 0 to score it anyway: upscaled, "
                            "with a note)")
  assert huge["score"] == "" and (huge["width"], huge["height"]) == ("17000", "12000")
  assert huge["error"] == (f"{tmp_path / 'huge.jpg'}: 17000x12000 = 204000000 pixels, more than --max_pixels "
                           "89478485 (a guard against decompression bombs; pass --max_pixels 204000000 or more to "
                           "allow it)")
  assert "max_upscale=None" not in err and "max_pixels=" not in err and small["error"] in err
  # As advised.
  assert score_cli.main(base + ["--max_upscale", "0", "--max_pixels", "204000000", str(tmp_path)]) == 0
  rows = {pathlib.Path(r["path"]).name: r for r in csv.DictReader(out.open())}
  assert all(r["error"] == "" and 0 < float(r["score"]) < 1 for r in rows.values()), rows
  assert (rows["huge.jpg"]["width"], rows["huge.jpg"]["height"]) == ("17000", "12000")
  assert "upscaled 42.67x" in rows["small.png"]["note"]
