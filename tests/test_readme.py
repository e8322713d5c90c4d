"""The README's main-job command (`make smoke`) runs as written: Makefile -> train.py -> eval.py, offline."""

import json
import os
import pathlib
import re
import subprocess
import sys

import e2e_support as e2e
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_readme_names_the_two_commands():
  readme = (REPO / "README.md").read_text()
  block = re.search(r"## The two commands\s+```bash\n(.*?)```", readme, re.S).group(1)
  commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
  assert commands == ["make smoke", "make test"]
  ci = (REPO / ".ci" / "run").read_text()
  assert re.search(r"^make test$", ci, re.M), ".ci/run must run exactly the README's test command"


@pytest.mark.slow
def test_make_smoke_runs_the_main_job(tmp_path):
  """`make smoke`, shortened to one epoch, leaves eval.json and eval_predictions.csv of the held-out photos.

  The shortening is conftest's `smoke_run` (e2e.SMOKE_RUN: one epoch, a checkpoint every 2 steps): the same XLA
  programs, which the session's compilation cache holds once `smoke_run` is built.
  """
  venv = pathlib.Path(sys.prefix)
  workdir = tmp_path / "smoke"
  args = " ".join(f"--config.{k}={v}" for k, v in e2e.SMOKE_RUN.items())
  env = dict(os.environ, CI="true")
  proc = subprocess.run(["make", "-C", str(REPO), "smoke", f"VENV={venv}", f"SMOKE_DIR={workdir}",
                         f"SMOKE_ARGS={args}"], capture_output=True, text=True, env=env, timeout=900, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads((workdir / "eval.json").read_text())
  assert result["dataset"] == "smoke" and result["part"] == "test" and result["num_images"] == 32
  rows = (workdir / "eval_predictions.csv").read_text().splitlines()
  assert rows[0] == "name,mos,score" and len(rows) == 33
  assert (workdir / "eval_scatter.png").stat().st_size > 0


def _readme_crops_snippet():
  """The README's Pillow + numpy `eval_crops`, run as written."""
  readme = (REPO / "README.md").read_text()
  (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "def eval_crops(" in b]
  namespace = {}
  exec(compile(block, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  return namespace["eval_crops"]


def test_readme_crops_snippet_makes_the_evaluation_crops(test_data, tmp_path):
  """Byte for byte `images.eval_crops` on CLIVE photos (square and portrait), for the base and smoke protocols, a
  reduced-DCT JPEG decode (short side >= 2x resize), an EXIF-rotated JPEG and a greyscale PNG."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from mcpf_jax import images  # pylint: disable=g-import-not-at-top
  snippet = _readme_crops_snippet()
  clive = test_data / "clive-mini" / "ChallengeDB_release" / "Images"
  files = [clive / "1004.JPG", clive / "1024.JPG", clive / "1038.JPG"]
  rotated = tmp_path / "rotated.jpg"
  with Image.open(files[1]) as img:
    exif = img.getexif()
    exif[0x0112] = 6  # stored sideways: shown turned 90 degrees clockwise
    img.save(rotated, quality=90, exif=exif)
  grey = tmp_path / "grey.png"
  with Image.open(files[2]) as img:
    img.convert("L").save(grey)
  files += [rotated, grey]
  # (224, ...): JPEGs decoded at 1/2 scale; (12, ...): at 1/8, then reduced by a whole factor before the bicubic step
  protocols = [(512, 224, 15), (256, 64, 9), (224, 224, 3), (240, 96, 7), (12, 8, 2)]
  for path in files:
    data = path.read_bytes()
    for resize, size, num_crops in protocols:
      ours = snippet(str(path), resize, size, num_crops)
      theirs, _ = images.eval_crops(data, str(path), resize=resize, image_size=size, num_crops=num_crops)
      assert ours.dtype == np.uint8 and ours.shape == theirs.shape, (path.name, resize, ours.shape, theirs.shape)
      assert ours.tobytes() == theirs.tobytes(), (path.name, resize, size, num_crops)
  # The rotated copy is stored portrait (640x960) and shown landscape: the crops were taken on what is shown.
  assert images.eval_crops(rotated.read_bytes(), "rotated.jpg", resize=256, image_size=64, num_crops=9)[1] == (640, 960)
