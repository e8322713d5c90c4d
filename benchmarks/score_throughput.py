"""Scoring throughput end to end (read + decode + resize + crops + model) vs the bare model on the same crops.

End to end is `mcpf_jax.scoring.Scorer.iter_score` over a folder of real-size JPEGs (the 500x500 LIVE Challenge
images of tests/data/clive-mini, linked `--num_images` times under distinct names into a temporary folder),
with the evaluation protocol of configs/base.py (short side 512, 15 crops of 224 per image). The model is MCPF
(configs/base.py) around random ViT-B/16 weights in the real size, built as `Scorer.from_checkpoint` builds a
trained one (`--model clipiqa`: `Scorer.zero_shot`). The bare model is the same jitted eval step
(`mcpf_jax.train.step.make_eval_step`) called on a uint8 batch already on the device, as many times as end to end
has batches. The two alternate (end-to-end pass, bare pass, ...) `--passes` times after a warm-up (compile);
images/s are from the median pass, and the ratio end-to-end / bare says how much the input side costs.
Decoding alone (the same threads, no model) is timed once for context.

  python benchmarks/score_throughput.py [--num_images 6] [--batch_size 2] [--num_crops 15] [--passes 2]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import pathlib
import tempfile

import _common  # pylint: disable=g-bad-import-order  (sets XLA_FLAGS before jax is imported)
import jax  # pylint: disable=g-import-not-at-top,wrong-import-order
import numpy as np

DEFAULT_IMAGES = _common.REPO / "tests" / "data" / "clive-mini" / "ChallengeDB_release" / "Images"


def _folder(src: pathlib.Path, num_images: int, dst: pathlib.Path) -> list[str]:
  files = sorted(p for p in src.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
  if not files:
    raise FileNotFoundError(f"no JPEG files in {src} (pass --images FOLDER)")
  for i in range(num_images):
    (dst / f"{i:05d}_{files[i % len(files)].name}").symlink_to(files[i % len(files)])
  return sorted(str(p) for p in dst.iterdir())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--images", type=pathlib.Path, default=DEFAULT_IMAGES)
  parser.add_argument("--num_images", type=int, default=6)
  parser.add_argument("--batch_size", type=int, default=2, help="images per model call")
  parser.add_argument("--num_crops", type=int, default=15)
  parser.add_argument("--num_workers", type=int, default=2, help="decoding threads of the Scorer")
  parser.add_argument("--passes", type=int, default=2)
  parser.add_argument("--model", default="mcpf", choices=["mcpf", "clipiqa"])
  parser.add_argument("--out", type=pathlib.Path, default=None)
  args = parser.parse_args()

  from configs import base  # pylint: disable=g-import-not-at-top
  from mcpf_jax import clip, images, scoring  # pylint: disable=g-import-not-at-top
  from mcpf_jax import model as iqa  # pylint: disable=g-import-not-at-top
  from mcpf_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top

  load_start = _common.load_average()
  print(f"{_common.cpu_model()}, {os.cpu_count()} CPUs; XLA {_common.THREADS} threads; load {load_start}")
  weights = _common.random_vit_b16()
  if args.model == "clipiqa":
    scorer = scoring.Scorer.zero_shot(weights, batch_size=args.batch_size, num_crops=args.num_crops,
                                      num_workers=args.num_workers)
    model, params = iqa.build({"name": "clipiqa"}, clip.load(weights), jax.random.key(0))
  else:
    config = base.get_config()
    model, params = iqa.build(config.model, clip.load(weights), jax.random.key(0))
    prep = scoring.Preprocessing(resize=config.data.resize, image_size=224, num_crops=args.num_crops)
    loaded = scoring.LoadedModel(model, params, prep, info={"model": "mcpf (random ViT-B/16)"})
    scorer = scoring.Scorer(loaded, batch_size=args.batch_size, num_workers=args.num_workers)
  bare_step = jax.jit(step_lib.make_eval_step(model))
  size = scorer.preprocessing.image_size
  rng = np.random.default_rng(0)
  bare_batch = {"image": jax.device_put(rng.integers(0, 256, (scorer.batch_size, args.num_crops, size, size, 3),
                                                     dtype=np.uint8))}
  params = jax.device_put(params)
  with tempfile.TemporaryDirectory(prefix="mcpf_score_bench_") as tmp:
    files = _folder(args.images, args.num_images, pathlib.Path(tmp))
    num_batches = -(-len(files) // scorer.batch_size)
    h, w = images.load(files[0]).shape[:2]
    print(f"{len(files)} files ({w}x{h} JPEG) in {tmp}; {scorer.batch_size} images x {args.num_crops} crops per "
          f"call, {num_batches} calls per pass")

    # Warm-up: compiles both (the same computation, jitted twice).
    compile_e2e, _ = _common.timed(lambda: scorer.score(files[:scorer.batch_size]))
    compile_bare, _ = _common.timed(lambda: bare_step(params, bare_batch).block_until_ready())

    def decode_only():
      with concurrent.futures.ThreadPoolExecutor(max(args.num_workers, 1)) as pool:
        return list(pool.map(lambda f: scorer.preprocessing.crops(images.load(f), f)[0].shape, files))

    decode_s, _ = _common.timed(decode_only)

    def end_to_end():
      results = scorer.score(files)
      bad = [r.error for r in results if not r.ok]
      assert not bad, bad
      return results

    def bare():
      for _ in range(num_batches):
        out = bare_step(params, bare_batch)
      return out.block_until_ready()

    res = _common.alternate({"end_to_end": end_to_end, "bare_model": bare}, args.passes)
  n_images = len(files)
  e2e = n_images / res["end_to_end"]["median_s"]
  model_ips = num_batches * scorer.batch_size / res["bare_model"]["median_s"]
  row = {"model": args.model, "images": n_images, "batch_size": scorer.batch_size, "num_crops": args.num_crops,
         "num_workers": args.num_workers, "end_to_end_img_s": e2e, "bare_model_img_s": model_ips,
         "end_to_end_crops_s": e2e * args.num_crops, "bare_model_crops_s": model_ips * args.num_crops,
         "ratio": e2e / model_ips, "decode_only_img_s": n_images / decode_s,
         "first_call_s": {"end_to_end": compile_e2e, "bare_model": compile_bare}, "calls": res,
         "load_1m": res["end_to_end"]["load_1m_during"]}
  print()
  print(_common.table([row], [("model", "model", ""), ("images", "images", "d"), ("batch_size", "batch", "d"),
                              ("num_crops", "crops", "d"), ("end_to_end_img_s", "end-to-end img/s", ".3f"),
                              ("bare_model_img_s", "bare model img/s", ".3f"), ("ratio", "ratio", ".3f"),
                              ("decode_only_img_s", "decode-only img/s", ".1f")]))
  print(f"load during: {row['load_1m']}")
  _common.write("score_throughput", {
      "machine": _common.machine(), "load_average_start": load_start, "load_average_end": _common.load_average(),
      "settings": {"images_folder": str(args.images), "resize": scorer.preprocessing.resize, "image_size": size,
                   "passes": args.passes, "weights": str(weights),
                   "end_to_end": "Scorer.score(files): read + decode + resize + crops in threads, model, scores",
                   "bare_model": "the jitted eval step on a device-resident uint8 batch, same calls"},
      "results": [row]}, args.out)


if __name__ == "__main__":
  main()
