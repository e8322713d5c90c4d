"""Scoring with a compiled scorer: an exported folder's `model.stablehlo` (`python -m mcpf_jax.export --stablehlo`).

  python -m mcpf_jax.compiled FOLDER IMAGE_OR_FOLDER ...     # one JSON line per image: path, score or error

Needs jax, numpy and Pillow, and nothing of this package's model, CLIP or training code: the artifact holds the
whole model with its parameters (`jax.export`, symbolic batch size, lowered for CPU, CUDA and TPU). Only
`mcpf_jax.images` is used, for the evaluation crops the artifact takes (`images.eval_crops` with the folder's
`preprocessing`: short side -> `resize`, `num_crops` crops of `image_size`).

  scorer = CompiledScorer("exported/livec")
  scorer.score(["a.jpg", "b.png"])          # [(path, score or None, error or None), ...]
  scorer(crops)                             # uint8 [batch, num_crops, S, S, 3] -> float32 [batch]
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np

from mcpf_jax import images

CONFIG_FILE = "config.json"


class CompiledScorer:
  """An exported folder's `model.stablehlo`, deserialised and ready to call.

  Attributes:
    resize, image_size, num_crops: the evaluation protocol of the folder's `preprocessing`.
    info: config.json's `stablehlo` entry (file, platforms, calling convention, input and output).
    score: config.json's `score` entry (scale, range, direction).
  """

  def __init__(self, folder: str | os.PathLike[str], batch_size: int = 16):
    folder = pathlib.Path(folder).expanduser()
    config_path = folder / CONFIG_FILE
    try:
      config = json.loads(config_path.read_text())
    except FileNotFoundError:
      raise FileNotFoundError(f"{config_path} not found: not an exported model folder") from None
    except json.JSONDecodeError as e:
      raise ValueError(f"{config_path}: not valid JSON ({e})") from e
    info = config.get("stablehlo")
    if not info:
      raise FileNotFoundError(f"{folder}: holds no compiled scorer (config.json has no 'stablehlo' entry); export "
                              "it with python -m mcpf_jax.export ... --stablehlo")
    path = folder / info["file"]
    if pathlib.PurePath(info["file"]).name != info["file"] or not path.is_file():
      raise FileNotFoundError(f"{folder}: config.json names the compiled scorer {info['file']!r}, which is not a "
                              "file of the folder")
    platform = jax.default_backend()
    if platform == "gpu":
      platform = "cuda"
    if platform not in info["platforms"]:
      raise ValueError(f"{path}: compiled for {info['platforms']}, not for this machine's {platform}")
    self.exported = jax.export.deserialize(bytearray(path.read_bytes()))
    prep = config["preprocessing"]
    self.resize, self.image_size, self.num_crops = int(prep["resize"]), int(prep["image_size"]), int(prep["num_crops"])
    self.info, self.score_info = info, config.get("score", {})
    self.batch_size = batch_size
    self._call = jax.jit(self.exported.call)

  def __call__(self, crops: Any) -> np.ndarray:
    """uint8 [batch, num_crops, S, S, 3] -> float32 [batch]: each image's score on the model's scale."""
    crops = np.asarray(crops)
    want = (self.num_crops, self.image_size, self.image_size, 3)
    if crops.dtype != np.uint8 or crops.ndim != 5 or crops.shape[1:] != want:
      raise ValueError(f"expected uint8 crops [batch, {', '.join(map(str, want))}], got {crops.dtype} "
                       f"{list(crops.shape)}")
    return np.asarray(self._call(crops))

  def crops(self, path: str | os.PathLike[str]) -> np.ndarray:
    """One image file -> its uint8 crops [num_crops, S, S, 3] (the folder's evaluation protocol)."""
    data = pathlib.Path(path).read_bytes()
    return images.eval_crops(data, os.fspath(path), resize=self.resize, image_size=self.image_size,
                             num_crops=self.num_crops)[0]

  def score(self, paths: Iterable[str | os.PathLike[str]]) -> list[tuple[str, float | None, str | None]]:
    """(path, score, None) per readable image, (path, None, error) per file that is not one; order kept."""
    out: list[tuple[str, float | None, str | None]] = []
    batch: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
      values = self(np.stack([c for _, c in batch]))
      for (k, _), v in zip(batch, values):
        out[k] = (out[k][0], float(v), None)
      batch.clear()

    for path in paths:
      try:
        crops = self.crops(path)
      except (OSError, ValueError) as e:  # unreadable, undecodable or refused (images' errors are ValueErrors)
        out.append((os.fspath(path), None, str(e)))
        continue
      out.append((os.fspath(path), None, None))
      batch.append((len(out) - 1, crops))
      if len(batch) == self.batch_size:
        flush()
    if batch:
      flush()
    return out


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] in (["-h"], ["--help"]):
    print(__doc__)
    return 0
  if len(argv) < 2:
    print("usage: python -m mcpf_jax.compiled FOLDER IMAGE_OR_FOLDER ... (--help for more)", file=sys.stderr)
    return 2
  try:
    scorer = CompiledScorer(argv[0])
  except (FileNotFoundError, ValueError) as e:
    print(f"mcpf_jax.compiled: {e}", file=sys.stderr)
    return 2
  paths: list[pathlib.Path] = []
  for arg in argv[1:]:
    p = pathlib.Path(arg)
    paths += sorted(f for f in p.rglob("*") if f.suffix.lower() in images.IMAGE_EXTENSIONS) if p.is_dir() else [p]
  failed = 0
  for path, value, error in scorer.score(paths):
    failed += error is not None
    print(json.dumps({"path": path, "score": value, "error": error}))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
