"""Images/s per core of the input paths, on real-size JPEGs, before and after the reduced-scale decode.

`python benchmarks/input_path.py [--repeats 3] [--per_size 6]`

Sizes: 4000x3000 (12 MP, SPAQ's cameras), 1024x768 (KonIQ-10k), 500x500 (LIVE Challenge: the real JPEGs of
tests/data/clive-mini). The 12 MP and 1024x768 files are real photos (scikit-image's astronaut, coffee, chelsea,
rocket, ...) enlarged bicubic to the camera size and saved as JPEG quality 90, since no full-size dataset photo is
on this machine. Everything runs in one process on one core (no XLA, no workers), alternated path by path:

- train, before: `images.decode` (full size) + `resize_short_side(S)` + a random 224 crop + flip
- train, after: `images.decode(short_side=S)` (a DCT-reduced decode for JPEGs >= 2S) + crop + flip
- train, pre-resized: decoding the PNG that `prepare --resize S` stores + crop + flip
- eval (15 crops), before: full decode + resize + 15 grid crops; after: `images.eval_crops` (the reduced decode)

Also the mean absolute difference (grey levels) of the reduced path from the full one, per size. Then, for the
step of MCPF on ViT-B/16 at batch 32 (--step_flops, default 2.3e12: the analytic count of the whole step), the
host cores each accelerator chip needs at --mfu to keep it fed. JSON in benchmarks/results/input_path.json.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time

import _common
import numpy as np  # pylint: disable=g-import-not-at-top
import PIL.Image  # pylint: disable=g-import-not-at-top
import skimage.data  # pylint: disable=g-import-not-at-top

from mcpf_jax import images  # pylint: disable=g-import-not-at-top

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina")
CLIVE = _common.REPO / "tests" / "data" / "clive-mini" / "ChallengeDB_release" / "Images"
# Peak dense bf16 FLOP/s per chip (vendor figures).
CHIPS = {"TPU v5e": 197e12, "TPU v4": 275e12, "TPU v5p": 459e12, "TPU v6e": 918e12, "A100": 312e12,
         "H100 SXM": 989e12}


def _jpeg(img: np.ndarray) -> bytes:
  buf = io.BytesIO()
  PIL.Image.fromarray(img).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def _png(img: np.ndarray) -> bytes:
  buf = io.BytesIO()
  PIL.Image.fromarray(img).save(buf, format="PNG")
  return buf.getvalue()


def _files(size: tuple[int, int] | None, n: int) -> list[bytes]:
  if size is None:
    return [p.read_bytes() for p in sorted(CLIVE.glob("*.JPG"))[:n]]
  out = []
  for name in PHOTOS[:n]:
    img = getattr(skimage.data, name)()
    if img.ndim == 2:
      img = np.repeat(img[..., None], 3, -1)
    out.append(_jpeg(np.array(PIL.Image.fromarray(img[..., :3]).resize(size, PIL.Image.BICUBIC))))
  return out


def _crop_flip(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  h, w = img.shape[:2]
  top, left = int(rng.integers(0, h - 224 + 1)), int(rng.integers(0, w - 224 + 1))
  crop = img[top:top + 224, left:left + 224]
  return np.ascontiguousarray(crop[:, ::-1] if rng.random() < 0.5 else crop)


def _paths(resize: int):
  rng = np.random.default_rng(0)

  def train_before(d):
    return _crop_flip(images.resize_short_side(images.decode(d), resize, max_upscale=None), rng)

  def train_after(d):
    return _crop_flip(images.decode(d, short_side=resize), rng)

  def eval_before(d):
    img = images.resize_short_side(images.decode(d), resize, max_upscale=None)
    pos = images.grid_crop_positions(img.shape[0], img.shape[1], 224, 15)
    return np.stack([images.crop(img, t, l, 224) for t, l in pos])

  def eval_after(d):
    return images.eval_crops(d, "x", resize=resize, image_size=224, num_crops=15)[0]

  return {"train before": train_before, "train after": train_after, "eval before": eval_before,
          "eval after": eval_after}


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--per_size", type=int, default=6)
  p.add_argument("--mfu", type=float, default=0.4)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--step_flops", type=float, default=2.3e12, help="MCPF ViT-B/16 train step at --batch (analytic)")
  args = p.parse_args(argv)
  sizes = {"12 MP 4000x3000 (SPAQ)": ((4000, 3000), 512), "1024x768 (KonIQ)": ((1024, 768), 512),
           "500x500 (CLIVE, real)": (None, 500)}
  rows, report = [], {}
  for label, (size, resize) in sizes.items():
    files = _files(size, args.per_size)
    pre = [_png(images.decode(d, short_side=resize)) if min(PIL.Image.open(io.BytesIO(d)).size) > resize else d
           for d in files]
    fns = _paths(resize)
    rng = np.random.default_rng(1)
    fns["train pre-resized"] = lambda d, r=resize: _crop_flip(images.decode(d, short_side=r), rng)
    inputs = {k: (pre if k == "train pre-resized" else files) for k in fns}
    times = {k: [] for k in fns}
    for k, fn in fns.items():  # warm-up: PIL's codecs, numpy's first allocations
      fn(inputs[k][0])
    for _ in range(args.repeats):
      for k, fn in fns.items():
        start = time.perf_counter()
        for d in inputs[k]:
          fn(d)
        times[k].append((time.perf_counter() - start) / len(files))
    mad = statistics.mean(float(np.abs(images.decode(d, short_side=resize).astype(np.int16)
                                       - images.resize_short_side(images.decode(d), resize, max_upscale=None)).mean())
                          for d in files)
    per_s = {k: 1.0 / statistics.median(v) for k, v in times.items()}
    report[label] = {"resize": resize, "images_per_s_per_core": per_s, "mad_grey_levels": mad,
                     "mean_bytes": statistics.mean(len(d) for d in files),
                     "mean_pre_resized_bytes": statistics.mean(len(d) for d in pre), "times_s": times}
    rows.append({"size": label, "resize": resize, **{k: per_s[k] for k in fns}, "mad": mad,
                 "speedup_train": per_s["train after"] / per_s["train before"],
                 "speedup_eval": per_s["eval after"] / per_s["eval before"]})
  cols = [("size", "images", "s"), ("resize", "S", "d"), ("train before", "train before", ".1f"),
          ("train after", "train after", ".1f"), ("train pre-resized", "pre-resized", ".1f"),
          ("speedup_train", "x", ".2f"), ("eval before", "eval before", ".1f"), ("eval after", "eval after", ".1f"),
          ("speedup_eval", "x", ".2f"), ("mad", "MAD", ".2f")]
  print(_common.table(rows, cols))
  chips = []
  for chip, peak in CHIPS.items():
    step_s = args.step_flops / (args.mfu * peak)
    need = args.batch / step_s
    row = {"chip": chip, "step_ms": 1000 * step_s, "images_per_s": need}
    for r in rows:
      row[r["size"] + " after"] = need / r["train after"]
      row[r["size"] + " pre"] = need / r["train pre-resized"]
    chips.append(row)
  print(_common.table(chips, [("chip", "chip", "s"), ("step_ms", "step ms", ".1f"), ("images_per_s", "img/s", ".0f")]
                      + [(r["size"] + " after", r["size"][:8] + " cores", ".1f") for r in rows]
                      + [(r["size"] + " pre", r["size"][:8] + " pre", ".1f") for r in rows]))
  _common.write("input_path", {"machine": _common.machine(), "sizes": report, "rows": rows, "chips": chips,
                               "mfu": args.mfu, "step_flops": args.step_flops, "batch": args.batch,
                               "load_after": _common.load_average(),
                               "command": " ".join(["python", "benchmarks/input_path.py"] + sys.argv[1:])})


if __name__ == "__main__":
  main()
