"""Score images: `python score.py --pretrained exported/livec --output scores.csv photos/ more.jpg`.

PATHS are image files and folders (searched recursively for image extensions, in sorted order). With --pretrained (a
folder written by `python -m mcpf_jax.export`, or a Hugging Face Hub id) or --workdir (a training run, with
--checkpoint best|latest|N as in eval.py) the scores are on the MOS scale of the dataset the model was trained on
(the JSON output's "scorer" says which, its range and its direction); with `--model clipiqa --clip NAME_OR_FOLDER`
they are zero-shot CLIP-IQA scores on [0, 1]. A local --pretrained folder never touches the network; a hub id goes
through the Hugging Face cache (HF_HUB_OFFLINE=1: the cache only).

Output (--format csv, or json; default from the --output extension): one row per file with `path`, `score`,
`error`, `width`, `height`, `note`. A file that cannot be read or decoded gets an error row and the others are
still scored; an image refused by a limit (--max_upscale, --max_pixels) keeps its width and height in the row.
Exit status: 0 when every image was scored; 1 when any failed (after writing every row), when no image was found
or the model could not be loaded; 2 for bad arguments (a PATH or --workdir that does not exist, an --output
folder that does not exist, a bad number), reported before the model is loaded, and for a --pretrained model whose
backbone must be given with --clip.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

# argparse, not absl as train.py / eval.py: this command takes PATHs, no config file, prints a --help of its own
# flags only and exits 2 on bad arguments; absl's flags serve the config-file commands of the training side.
COLUMNS = ("path", "score", "error", "width", "height", "note")
# How to lift each limit of mcpf_jax.images, in this command's flags (the library's messages name its Python
# arguments: `max_upscale=None`); `needed` is the smallest value that allows the image.
ADVICE = {"max_upscale": "pass --max_upscale 0 to score it anyway: upscaled, with a note",
          "max_pixels": "a guard against decompression bombs; pass --max_pixels {needed} or more to allow it"}


def _number(kind, low: float, what: str):
  """An argparse type: `kind` (int or float) at least `low`; anything else is a usage error (exit 2)."""

  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if value < low:
      raise argparse.ArgumentTypeError(f"{text} is not {what}")
    return value

  return parse


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python score.py", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("paths", nargs="+", metavar="PATH", help="image files and folders")
  p.add_argument("--pretrained", metavar="DIR_OR_ID",
                 help="an exported model folder (python -m mcpf_jax.export) or a Hugging Face Hub model id")
  p.add_argument("--revision", default=None, help="with a --pretrained hub id: the branch, tag or commit")
  p.add_argument("--workdir", help="a training run's workdir (or its checkpoints/<step> folder)")
  p.add_argument("--checkpoint", default=None,
                 help="best (default) | latest | a step number (with --workdir, as in eval.py)")
  p.add_argument("--model", default=None, choices=("clipiqa",),
                 help="zero-shot model to use without --workdir / --pretrained")
  p.add_argument("--clip", default=None,
                 help="CLIP hub id or folder: the zero-shot backbone, or where a trained model's backbone is")
  p.add_argument("--output", "-o", default="-", help="output file ('-': stdout)")
  p.add_argument("--format", choices=("csv", "json"), default=None,
                 help="default: json for a .json output, else csv")
  positive = _number(int, 1, "a whole number of at least 1")
  p.add_argument("--batch_size", type=positive, default=16, help="images per model call")
  p.add_argument("--num_crops", type=positive, default=None,
                 help="crops per image (default: the run's eval.num_crops; 15 zero-shot)")
  p.add_argument("--num_workers", type=_number(int, 0, "a whole number of at least 0"), default=2,
                 help="decoding threads")
  p.add_argument("--max_upscale", type=_number(float, 0, "a factor of at least 0"), default=None,
                 help="refuse images that must be enlarged more than this to the model's short side (default: "
                      "the evaluation protocol's 2x for trained models, as eval.py; any for zero-shot; 0: any, "
                      "with a note past 2x)")
  p.add_argument("--max_pixels", type=positive, default=None,
                 help="refuse images of more pixels than this, before decoding them (default: 89478485, ~89 MP, a "
                      "guard against decompression bombs); a larger value allows larger photos, replacing PIL's "
                      "own guard for this run only (a huge JPEG is read at a reduced scale, in little memory)")
  p.add_argument("--no_progress", action="store_true", help="no progress bar")
  return p


def _error(r) -> str | None:
  """The result's error, a limit's refusal worded with this command's flags."""
  e = r.refused
  if e is None:
    return r.error
  return e.explain(f"--{e.option} {e.limit}", ADVICE[e.option].format(needed=e.needed))


def _format_row(r) -> dict[str, Any]:
  return {"path": r.path, "score": None if r.score is None else round(r.score, 6), "error": _error(r),
          "width": r.width, "height": r.height, "note": r.note}


class _CsvWriter:
  """Writes rows as they come, so a long run leaves its rows on disk."""

  def __init__(self, f: TextIO, info: dict[str, Any]):
    del info
    self._f = f
    self._w = csv.writer(f)
    self._w.writerow(COLUMNS)

  def write(self, row: dict[str, Any]) -> None:
    self._w.writerow(["" if row[k] is None else (f"{row[k]:.6f}" if k == "score" else row[k]) for k in COLUMNS])
    self._f.flush()

  def close(self, summary: dict[str, Any]) -> None:
    del summary


class _JsonWriter:
  """{"scorer": info, "summary": {...}, "results": [rows]}, written at the end."""

  def __init__(self, f: TextIO, info: dict[str, Any]):
    self._f, self._info, self._rows = f, info, []

  def write(self, row: dict[str, Any]) -> None:
    self._rows.append(row)

  def close(self, summary: dict[str, Any]) -> None:
    json.dump({"scorer": self._info, "summary": summary, "results": self._rows}, self._f, indent=1)
    self._f.write("\n")


def _make_scorer(args):
  from mcpf_jax.scoring import DEFAULT_NUM_CROPS, Scorer  # pylint: disable=g-import-not-at-top
  common = dict(batch_size=args.batch_size, num_workers=args.num_workers)
  if args.max_upscale is not None:
    common["max_upscale"] = args.max_upscale if args.max_upscale > 0 else None
  if args.max_pixels is not None:
    common["max_pixels"] = args.max_pixels
  if args.pretrained:
    return Scorer.from_pretrained(args.pretrained, revision=args.revision, num_crops=args.num_crops,
                                  clip_name=args.clip, **common)
  if args.workdir:
    return Scorer.from_checkpoint(args.workdir, args.checkpoint or "best", num_crops=args.num_crops,
                                  clip_name=args.clip, **common)
  return Scorer.zero_shot(args.clip, num_crops=args.num_crops or DEFAULT_NUM_CROPS, **common)


def main(argv: Sequence[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  if sum(bool(x) for x in (args.pretrained, args.workdir, args.model)) > 1:
    parser.error("give one of --pretrained (an exported model), --workdir (a training run) or --model clipiqa "
                 "(zero-shot)")
  if not args.pretrained and not args.workdir and not args.model:
    parser.error("give --pretrained DIR_OR_HUB_ID, --workdir WORKDIR, or --model clipiqa --clip NAME_OR_FOLDER "
                 "for zero-shot scores")
  if args.checkpoint is not None and not args.workdir:
    parser.error("--checkpoint (best | latest | a step) goes with --workdir (the training run)")
  if args.revision and not args.pretrained:
    parser.error("--revision goes with a --pretrained hub id")
  if args.model and not args.clip:
    parser.error("--model clipiqa needs --clip (a hub id such as openai/clip-vit-base-patch16, or a folder)")
  # What can be checked from the arguments alone is checked before the model is loaded (seconds).
  missing = [p + (" (a broken link)" if os.path.lexists(p) else "") for p in args.paths if not os.path.exists(p)]
  if missing:
    parser.error(f"no such file or folder: {', '.join(missing)}")
  if args.workdir:
    from mcpf_jax import rundir  # pylint: disable=g-import-not-at-top
    try:
      found = rundir.path(args.workdir).exists()  # a local folder or gs://bucket/path
    except ValueError as e:  # a URL of a storage no run folder can be on
      parser.error(f"--workdir {e}")
    if not found:
      parser.error(f"--workdir {args.workdir}: no such folder (a training run's workdir)")
  if args.output != "-":
    if os.path.isdir(args.output):
      parser.error(f"--output {args.output} is a folder: give a file name, e.g. "
                   f"{os.path.join(args.output, 'scores.csv')}")
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
      parser.error(f"--output {args.output}: the folder {folder} does not exist")
  fmt = args.format or ("json" if args.output.lower().endswith(".json") else "csv")
  # Library INFO logs (orbax, absl) would bury the progress bar; warnings and errors still show.
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.ERROR)

  import tqdm  # pylint: disable=g-import-not-at-top

  from mcpf_jax.scoring import find_images  # pylint: disable=g-import-not-at-top

  paths = find_images(args.paths)
  if not paths:
    print(f"score.py: no image files found in {' '.join(args.paths)} (extensions: jpg, png, tif, bmp, webp, ...)",
          file=sys.stderr)
    return 1
  try:
    scorer = _make_scorer(args)
  except (FileNotFoundError, ValueError) as e:
    from mcpf_jax.pretrained import MissingBackbone  # pylint: disable=g-import-not-at-top
    print(f"score.py: {e}", file=sys.stderr)
    return 2 if isinstance(e, MissingBackbone) else 1  # a --clip is missing: a usage error, like bad arguments

  out = sys.stdout if args.output == "-" else open(args.output, "w", newline="", encoding="utf-8")
  try:
    writer = (_JsonWriter if fmt == "json" else _CsvWriter)(out, scorer.info)
    failed = 0
    with tqdm.tqdm(total=len(paths), unit="img", desc="score", disable=args.no_progress, file=sys.stderr,
                   dynamic_ncols=True) as bar:
      for result in scorer.iter_score(paths):
        row = _format_row(result)
        writer.write(row)
        failed += not result.ok
        bar.update(1)
        if not result.ok:
          bar.write(f"error: {row['error']}", file=sys.stderr)
    summary = {"images": len(paths), "scored": len(paths) - failed, "failed": failed}
    writer.close(summary)
  finally:
    if out is not sys.stdout:
      out.close()
  where = "" if args.output == "-" else f" -> {os.path.abspath(args.output)}"
  print(f"score.py: {summary['scored']} of {len(paths)} images scored, {failed} failed{where}", file=sys.stderr)
  return 0 if failed == 0 else 1


if __name__ == "__main__":
  sys.exit(main())
