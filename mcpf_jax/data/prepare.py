"""Builds one dataset from its extracted release folder and prints a one-line JSON summary.

  python -m mcpf_jax.data.prepare NAME --manual_dir M --data_dir D [--skip_bad --report R] [--liqe_dir L] [--overwrite]
  python -m mcpf_jax.data.prepare csv --manual_dir IMAGES --data_dir D --csv_path scores.csv \
      --image_column path --mos_column mos [--config_name mydata ...]

Prints {"dataset", "config", "num_examples", "data_dir", "skipped", "report"} on one line (tfds's progress output
goes to stderr). Exit status 1 with the error on stderr when the folder or a label row is bad.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import shutil
import sys
from collections.abc import Sequence

from mcpf_jax.data import builders, problems, sources


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m mcpf_jax.data.prepare", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("name", choices=sorted(builders.BUILDERS))
  p.add_argument("--manual_dir", required=True, help="the extracted release folder")
  p.add_argument("--data_dir", required=True, help="where the array_record files go")
  p.add_argument("--skip_bad", action="store_true", help="skip bad rows and write a JSON report instead of failing")
  p.add_argument("--report", default=None, help="skip report path (default <data_dir>/<name>-skip-report.json)")
  p.add_argument("--liqe_dir", default=None, help="folder of LIQE split folders, to join scene/distortion labels")
  p.add_argument("--decode_check", default="full", choices=("full", "verify", "none"))
  p.add_argument("--num_threads", type=int, default=None)
  p.add_argument("--resize", type=int, default=None,
                 help="store the images pre-resized to this short side (lossless PNG), for a training config with "
                      "the same data.resize: no full-size decode per epoch (use its own --data_dir)")
  p.add_argument("--overwrite", action="store_true",
                 help="delete this dataset's already-built version folder first (tfds otherwise reuses it)")
  p.add_argument("--dmos", default="auto", choices=("auto", "realigned", "original"), help="live only")
  g = p.add_argument_group("csv dataset")
  g.add_argument("--config_name", default="default")
  g.add_argument("--csv_path")
  g.add_argument("--image_column", default="image")
  g.add_argument("--mos_column", default="mos")
  g.add_argument("--std_column")
  g.add_argument("--content_column")
  g.add_argument("--split_column")
  g.add_argument("--delimiter", default=",")
  g.add_argument("--image_root", default="")
  g.add_argument("--lower_is_better", action="store_true")
  g.add_argument("--mos_range", type=float, nargs=2)
  g.add_argument("--liqe_folder")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  kwargs = dict(skip_bad=args.skip_bad, report_path=args.report, liqe_dir=args.liqe_dir,
                decode_check=args.decode_check, num_threads=args.num_threads, resize=args.resize)
  if args.name == "live":
    kwargs["dmos"] = args.dmos
  if args.name == "csv":
    if not args.csv_path:
      print("prepare csv: --csv_path is required", file=sys.stderr)
      return 2
    kwargs["config"] = builders.CsvConfig(
        name=args.config_name, csv_path=args.csv_path, image_column=args.image_column, mos_column=args.mos_column,
        std_column=args.std_column, content_column=args.content_column, split_column=args.split_column,
        delimiter=args.delimiter, image_root=args.image_root, higher_is_better=not args.lower_is_better,
        mos_range=tuple(args.mos_range) if args.mos_range else None, liqe_folder=args.liqe_folder)
  try:
    # tfds prints progress on stdout; keep stdout for the one JSON line.
    with contextlib.redirect_stdout(sys.stderr):
      b = sources.builder(args.name, data_dir=args.data_dir, **kwargs)
      if args.overwrite and pathlib.Path(b.data_dir).is_dir():
        shutil.rmtree(b.data_dir)
      b.download_and_prepare(download_config=_download_config(args.manual_dir))
  except problems.DatasetError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  summary = {"dataset": args.name, "config": b.builder_config.name if b.builder_config else None,
             "num_examples": b.info.splits[builders.SPLIT].num_examples, "data_dir": str(b.data_dir),
             "skipped": int(b.info.metadata.get("skipped", 0)),
             "report": str(b.skip_report) if b.skip_report else b.info.metadata.get("skip_report")}
  print(json.dumps(summary))
  return 0


def _download_config(manual_dir: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.download.DownloadConfig(manual_dir=manual_dir)


if __name__ == "__main__":
  sys.exit(main())
