"""Decode throughput of the training input pipeline: images/s of decode + resize + random crop + flip + batch.

Reads real JPEGs (default: the 500x500 LIVE Challenge images of tests/data/clive-mini), repeats them to
`--num_images` records in a plain list source, and runs `mcpf_jax.data.pipeline.train_loader` for one epoch with
each worker count and read-thread count ("auto": `pipeline.input_sizes`, what train.py uses by default, sized
from the cores this process may run on). Two rates per run: `steady` from the first batch to the last (the rate a
long training run sees) and `total` including the worker start-up. Prints a table and writes JSON to
benchmarks/results/.

  python benchmarks/decode_throughput.py [--workers 0 1 2 auto] [--threads 1 2 auto] [--num_images 384]
      [--resize 512] [--image_size 224]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mcpf_jax import scores  # noqa: E402  (after the sys.path line above)
from mcpf_jax.data import pipeline  # noqa: E402  (after the sys.path line above)

DEFAULT_IMAGES = REPO / "tests" / "data" / "clive-mini" / "ChallengeDB_release" / "Images"


def _source(folder: pathlib.Path, num_images: int) -> tuple[list[dict], list[str]]:
  files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
  if not files:
    raise FileNotFoundError(f"no .jpg files in {folder} (pass --images FOLDER)")
  records = [{"image": p.read_bytes(), "name": p.name, "mos": float(i)} for i, p in enumerate(files)]
  return [records[i % len(records)] for i in range(num_images)], [p.name for p in files]


def _count(text: str) -> int:
  """A worker or thread count: a whole number >= 0, or "auto" (pipeline.AUTO)."""
  if text == "auto":
    return pipeline.AUTO
  value = int(text)
  if value < 0:
    raise argparse.ArgumentTypeError(f"expected a whole number >= 0 or 'auto', got {text}")
  return value


def _run(source: list[dict], score_map: scores.ScoreMap, args: argparse.Namespace, workers: int,
         threads: int) -> dict:
  asked = {"asked_workers": "auto" if workers == pipeline.AUTO else workers,
           "asked_threads": "auto" if threads == pipeline.AUTO else threads}
  workers, threads = pipeline.input_sizes(workers, threads)
  start = time.perf_counter()
  it = iter(pipeline.train_loader(source, range(len(source)), batch_size=args.batch_size,
                                  image_size=args.image_size, resize=args.resize, seed=0, score_map=score_map,
                                  num_workers=workers, num_threads=threads, num_epochs=1))
  try:
    next(it)
    first = time.perf_counter()
    batches = 1 + sum(1 for _ in it)
    end = time.perf_counter()
  finally:
    it.close()
  images = batches * args.batch_size
  return {**asked, "num_workers": workers, "num_threads": threads, "images": images,
          "startup_s": round(first - start, 3),
          "steady_images_per_s": round((images - args.batch_size) / (end - first), 1),
          "total_images_per_s": round(images / (end - start), 1)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--images", type=pathlib.Path, default=DEFAULT_IMAGES, help="folder of JPEG files")
  parser.add_argument("--num_images", type=int, default=384, help="records (the files repeated)")
  parser.add_argument("--workers", type=_count, nargs="+", default=[0, 1, 2, pipeline.AUTO],
                      help="worker processes (or auto)")
  parser.add_argument("--threads", type=_count, nargs="+", default=[1, pipeline.AUTO],
                      help="read threads per process (or auto)")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--resize", type=int, default=512)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--out", type=pathlib.Path, default=REPO / "benchmarks" / "results" / "decode_throughput.json")
  args = parser.parse_args()

  source, files = _source(args.images, args.num_images)
  sizes = sorted({len(r["image"]) for r in source})
  score_map = scores.ScoreMap.fit([r["mos"] for r in source], higher_is_better=True)
  results = []
  load_at_start = round(os.getloadavg()[0], 2)
  print(f"{len(files)} JPEG files from {args.images}, repeated to {len(source)} records; resize {args.resize}, "
        f"crop {args.image_size}, batch {args.batch_size}; {os.cpu_count()} CPUs ({pipeline.host_cores()} usable: auto "
        f"= {pipeline.input_sizes()} workers x threads), load {os.getloadavg()[0]:.1f}")
  print(f"{'asked':>10} {'workers':>7} {'threads':>7} {'startup s':>9} {'steady img/s':>12} {'total img/s':>11}")
  seen = set()
  for workers in args.workers:
    for threads in args.threads:
      if pipeline.input_sizes(workers, threads) in seen:
        continue  # e.g. 0 workers x auto threads = 0 x 2 on 2 cores, measured already
      seen.add(pipeline.input_sizes(workers, threads))
      r = _run(source, score_map, args, workers, threads)
      results.append(r)
      asked = f"{r['asked_workers']}x{r['asked_threads']}"
      print(f"{asked:>10} {r['num_workers']:>7} {r['num_threads']:>7} {r['startup_s']:>9.2f} "
            f"{r['steady_images_per_s']:>12.1f} {r['total_images_per_s']:>11.1f}", flush=True)
  report = {
      "benchmark": "decode_throughput", "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "machine": {"cpus": os.cpu_count(), "usable_cores": pipeline.host_cores(),
                  "load_average_1m_at_start": load_at_start,
                  "load_average_1m_at_end": round(os.getloadavg()[0], 2),
                  "platform": platform.platform(), "python": platform.python_version()},
      "input": {"folder": str(args.images), "files": len(files), "records": len(source),
                "bytes_min": sizes[0], "bytes_median": int(np.median([len(r["image"]) for r in source])),
                "bytes_max": sizes[-1]},
      "settings": {"resize": args.resize, "image_size": args.image_size, "batch_size": args.batch_size},
      "results": results,
  }
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(report, indent=2) + "\n")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
