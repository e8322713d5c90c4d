"""A demo page: score images in the browser with a trained model (Gradio, on localhost).

  python -m mcpf_jax.demo --pretrained exported/livec [--port 7860]
  python -m mcpf_jax.demo --workdir runs/livec [--checkpoint best|latest|N]

Drop images on the page: each gets its score on the model's scale, the model's quality levels' probabilities are a
bar chart (pick the image), and the table of all of them sorts by any column and downloads as CSV (the columns of
score.py's: file, score, error, width, height, note). A file that cannot be scored (not an image, truncated, too
small) shows its error on its own row; the others are still scored. The scoring is the `Scorer`'s
(`mcpf_jax.scoring`), loaded as score.py loads it, so the page gives score.py's numbers.

Gradio is an optional extra (`pip install -e .[demo]`); it is imported only when the page starts. The server
listens on 127.0.0.1 unless --host says otherwise, and sends nothing to Gradio's analytics.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

COLUMNS = ("file", "score", "error", "width", "height", "note")
GRADIO = "gradio==6.31.0"  # the extra's pin (pyproject.toml [project.optional-dependencies] demo)


@dataclasses.dataclass(frozen=True)
class Row:
  """One uploaded file's outcome, as the page shows it: the file's name (not the server's temporary path)."""
  file: str
  score: float | None
  error: str | None
  width: int | None
  height: int | None
  note: str | None
  levels: tuple[float, ...] | None

  def values(self) -> list[Any]:
    return [self.file, None if self.score is None else round(self.score, 6), self.error, self.width, self.height,
            self.note]


def score_files(scorer, paths: Sequence[str]) -> list[Row]:
  """Scores uploaded files with `scorer` (a `mcpf_jax.scoring.Scorer`): one Row per file, in order.

  Rows are named by the file's base name (an upload lives in a temporary folder of the server's; a repeated name
  gets " (2)", " (3)", ...), and errors name the file the same way.
  """
  rows, seen = [], {}
  for r in scorer.score(list(paths)):
    base = os.path.basename(r.path)
    seen[base] = seen.get(base, 0) + 1
    name = base if seen[base] == 1 else f"{base} ({seen[base]})"
    error = None if r.error is None else r.error.replace(r.path, name)
    rows.append(Row(name, r.score, error, r.width, r.height, r.note, r.levels))
  return rows


def write_csv(rows: Sequence[Row], path: str) -> str:
  """The table as CSV (score.py's columns, `file` for `path`); returns `path`."""
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(COLUMNS)
    for row in rows:
      w.writerow(["" if v is None else (f"{v:.6f}" if k == "score" else v) for k, v in zip(COLUMNS, row.values())])
  return path


def describe(scorer) -> str:
  """What a score means, in one line of Markdown."""
  low, high = scorer.score_range
  info = scorer.info
  where = f", step {info['step']}" if info.get("step") is not None else ""
  return (f"**Scores**: {scorer.scale}, on [{low:g}, {high:g}], {'higher' if scorer.higher_is_better else 'lower'} "
          f"is better. Model: {info.get('model')}{where}; {scorer.preprocessing.num_crops} crops of "
          f"{scorer.preprocessing.image_size} px after resizing the short side to {scorer.preprocessing.resize}.")


def _import_gradio():
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
  try:
    import gradio  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SystemExit(f"python -m mcpf_jax.demo needs Gradio, an optional extra of mcpf_jax: pip install -e '.[demo]' "
                     f"(or pip install {GRADIO}) ({e})") from None
  return gradio


def build(scorer, gr=None):
  """The Gradio Blocks of the page around a loaded `Scorer` (not launched)."""
  gr = gr or _import_gradio()
  import pandas as pd  # pylint: disable=g-import-not-at-top  (a dependency of gradio)

  names = list(scorer.level_names)
  out_dir = tempfile.mkdtemp(prefix="mcpf_jax_demo_")

  def chart(levels: dict[str, list[float]], choice: str | None):
    p = levels.get(choice) if choice else None
    return pd.DataFrame({"level": names, "probability": p if p is not None else [0.0] * len(names)})

  def run(files: list[str] | None):
    paths = [f if isinstance(f, str) else f.name for f in files or []]
    if not paths:
      return (pd.DataFrame(columns=list(COLUMNS)), None, gr.update(choices=[], value=None), {}, chart({}, None))
    rows = score_files(scorer, paths)
    table = pd.DataFrame([row.values() for row in rows], columns=list(COLUMNS))
    folder = tempfile.mkdtemp(dir=out_dir)
    csv_path = write_csv(rows, os.path.join(folder, "scores.csv"))
    levels = {row.file: list(row.levels) for row in rows if row.levels is not None}
    first = next(iter(levels), None)
    return table, csv_path, gr.update(choices=list(levels), value=first), levels, chart(levels, first)

  with gr.Blocks(title="mcpf_jax: image quality") as page:
    gr.Markdown("## Image quality\n" + describe(scorer))
    files = gr.File(file_count="multiple", label="Images (drop files here)", elem_id="images")
    table = gr.Dataframe(headers=list(COLUMNS), label="Scores (sort from a column's ⋮ menu)", interactive=False,
                         wrap=True, elem_id="scores")
    download = gr.File(label="CSV", elem_id="csv")
    with gr.Row():
      pick = gr.Dropdown(choices=[], label="Quality levels of", elem_id="pick")
    levels = gr.State({})
    plot = gr.BarPlot(chart({}, None), x="level", y="probability", y_lim=[0, 1], sort=names,
                      label="Probability of each quality level", elem_id="levels")
    files.change(run, inputs=files, outputs=[table, download, pick, levels, plot])
    pick.change(chart, inputs=[levels, pick], outputs=plot)
  return page


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m mcpf_jax.demo", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--pretrained", metavar="DIR_OR_ID",
                 help="an exported model folder (python -m mcpf_jax.export) or a Hugging Face Hub model id")
  p.add_argument("--revision", default=None, help="with a --pretrained hub id: the branch, tag or commit")
  p.add_argument("--workdir", help="a training run's workdir (or its checkpoints/<step> folder)")
  p.add_argument("--checkpoint", default=None, help="best (default) | latest | a step number (with --workdir)")
  p.add_argument("--clip", default=None, help="where a trained model's CLIP backbone is, if not where it was")
  p.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
  p.add_argument("--port", type=int, default=7860, help="the port to listen on")
  p.add_argument("--batch_size", type=int, default=4, help="images per model call")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  if bool(args.pretrained) == bool(args.workdir):
    parser.error("give one of --pretrained (an exported model) or --workdir (a training run)")
  if args.checkpoint is not None and not args.workdir:
    parser.error("--checkpoint (best | latest | a step) goes with --workdir (the training run)")
  if args.revision and not args.pretrained:
    parser.error("--revision goes with a --pretrained hub id")
  if args.batch_size < 1:
    parser.error(f"--batch_size {args.batch_size}: expected at least 1")
  gr = _import_gradio()  # before the model: a missing extra is said at once
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.ERROR)

  import numpy as np  # pylint: disable=g-import-not-at-top

  from mcpf_jax.scoring import Scorer  # pylint: disable=g-import-not-at-top
  try:
    if args.pretrained:
      scorer = Scorer.from_pretrained(args.pretrained, revision=args.revision, clip_name=args.clip,
                                      batch_size=args.batch_size)
    else:
      scorer = Scorer.from_checkpoint(args.workdir, args.checkpoint or "best", clip_name=args.clip,
                                      batch_size=args.batch_size)
  except (FileNotFoundError, ValueError) as e:
    print(f"mcpf_jax.demo: {e}", file=sys.stderr)
    return 1
  # Compile the model before serving: the first upload is then as fast as the others.
  side = scorer.preprocessing.resize
  scorer.score(np.full((side, side, 3), 128, np.uint8))
  print(f"mcpf_jax.demo: {scorer.scale} ({scorer.info.get('model')}), on http://{args.host}:{args.port}",
        file=sys.stderr, flush=True)
  build(scorer, gr).launch(server_name=args.host, server_port=args.port, share=False, show_error=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
