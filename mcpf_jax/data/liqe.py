"""Scene and distortion labels from LIQE's split files (zwx8981/LIQE, `IQA_Database/<dataset>/splits2/**/*_clip.txt`).

Each `*_clip.txt` line is tab-separated: `<path> <score> <distortion> <scene 1> <scene 2> <scene 3>`, where the
path is relative to the dataset's root folder, the distortion is one of LIQE's 33 fine names and unused scene slots
hold `invalid`. LIQE's code (BIQA_benchmark.py, `dist_map` / `map2label`) groups the 33 fine names into 11 coarse
classes; `FINE_TO_COARSE` is that table. Labels are keyed by path, so the same image listed in several split files
must carry the same labels (checked).
"""

from __future__ import annotations

import dataclasses
import pathlib

from mcpf_jax import classes
from mcpf_jax.data import problems

# LIQE's 33 fine distortion names, in LIQE's `type2label` order (the fine index).
FINE_DISTORTIONS = (
    "jpeg2000 compression", "jpeg compression", "white noise", "gaussian blur", "fastfading", "fnoise", "contrast",
    "lens", "motion", "diffusion", "shifting", "color quantization", "oversaturation", "desaturation",
    "white with color", "impulse", "multiplicative", "white noise with denoise", "brighten", "darken",
    "shifting the mean", "jitter", "noneccentricity patch", "pixelate", "quantization", "color blocking", "sharpness",
    "realistic blur", "realistic noise", "underexposure", "overexposure", "realistic contrast change",
    "other realistic")

# LIQE's `dist_map`: fine name -> coarse class name (one of mcpf_jax.classes.DISTORTIONS).
FINE_TO_COARSE = {
    "jpeg2000 compression": "jpeg2000 compression", "jpeg compression": "jpeg compression", "white noise": "noise",
    "gaussian blur": "blur", "fastfading": "jpeg2000 compression", "fnoise": "noise", "contrast": "contrast",
    "lens": "blur", "motion": "blur", "diffusion": "color", "shifting": "blur", "color quantization": "quantization",
    "oversaturation": "color", "desaturation": "color", "white with color": "noise", "impulse": "noise",
    "multiplicative": "noise", "white noise with denoise": "noise", "brighten": "overexposure",
    "darken": "underexposure", "shifting the mean": "other", "jitter": "spatial", "noneccentricity patch": "spatial",
    "pixelate": "spatial", "quantization": "quantization", "color blocking": "spatial", "sharpness": "contrast",
    "realistic blur": "blur", "realistic noise": "noise", "underexposure": "underexposure",
    "overexposure": "overexposure", "realistic contrast change": "contrast", "other realistic": "other"}

# Folder name of each dataset inside LIQE's IQA_Database (and in tests/data/labels/liqe_splits).
LIQE_FOLDERS = {
    "livec": "ChallengeDB_release",
    "koniq10k": "koniq-10k",
    "kadid10k": "kadid10k",
    "csiq": "CSIQ",
    "live": "databaserelease2",
}

_INVALID_SCENE = "invalid"


@dataclasses.dataclass(frozen=True)
class LiqeLabel:
  """LIQE labels of one image.

  Attributes:
    scene: multi-hot over mcpf_jax.classes.SCENES, [9] bools.
    distortion: coarse class index into mcpf_jax.classes.DISTORTIONS (0..10).
    distortion_fine: index into FINE_DISTORTIONS (0..32).
    where: `file:line` the labels came from, for messages.
  """
  scene: tuple[bool, ...]
  distortion: int
  distortion_fine: int
  where: str


def coarse_index(fine_name: str) -> int:
  """Coarse class index (0..10) of one of LIQE's 33 fine distortion names."""
  return classes.DISTORTIONS.index(FINE_TO_COARSE[fine_name])


def read_split_files(folder: pathlib.Path, dataset: str = "") -> dict[str, LiqeLabel]:
  """Reads every `*_clip.txt` under `folder` (recursively) into {relative image path: labels}.

  Args:
    folder: one dataset's LIQE folder, e.g. `.../liqe_splits/ChallengeDB_release`.
    dataset: dataset name for error messages.

  Returns:
    Labels keyed by the path in column 1 (relative to the dataset root, `/`-separated).

  Raises:
    problems.DatasetError: a line that is not 6 tab-separated fields, an unknown distortion or scene name, or one
      path listed with different labels in two files.
  """
  out: dict[str, LiqeLabel] = {}
  files = sorted(folder.rglob("*_clip.txt"))
  if not files:
    raise problems.DatasetError(dataset, str(folder), None,
                                "no LIQE `*_clip.txt` split files found there "
                                "(expected <folder>/splits2/<k>/*_clip.txt)")
  for path in files:
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
      if not line.strip():
        continue
      where = f"{path}:{line_no}"
      fields = line.split("\t")
      if len(fields) != 6:
        raise problems.DatasetError(dataset, str(path), f"line {line_no}",
                                    "expected 6 tab-separated fields (path, score, distortion, 3 scenes), "
                                    f"got {len(fields)}")
      rel, _, fine, *scene_names = (f.strip() for f in fields)
      if fine not in FINE_TO_COARSE:
        raise problems.DatasetError(dataset, str(path), f"line {line_no}",
                                    f"unknown LIQE distortion name {fine!r} (expected one of LIQE's 33 names)")
      scene = [False] * len(classes.SCENES)
      for s in scene_names:
        if s == _INVALID_SCENE:
          continue
        if s not in classes.SCENES:
          raise problems.DatasetError(dataset, str(path), f"line {line_no}",
                                      f"unknown LIQE scene name {s!r} "
                                      f"(expected one of {classes.SCENES} or 'invalid')")
        scene[classes.SCENES.index(s)] = True
      label = LiqeLabel(tuple(scene), coarse_index(fine), FINE_DISTORTIONS.index(fine), where)
      previous = out.get(rel)
      if previous is not None and (previous.scene, previous.distortion_fine) != (label.scene, label.distortion_fine):
        raise problems.DatasetError(dataset, str(path), f"line {line_no}",
                                    f"{rel} has labels that differ from {previous.where}")
      out.setdefault(rel, label)
  return out
