"""Scoring users' images: `Scorer`, from an exported model, a trained checkpoint or zero-shot (CLIP-IQA).

  scorer = Scorer.from_pretrained("exported/livec")        # or a hub id; or Scorer.from_checkpoint("runs/livec")
  for r in scorer.score(["photo.jpg", "scans/a.png"]):     # or scorer.iter_score(...) to stream
    print(r.path, r.score, r.error)
  scorer.score_range, scorer.higher_is_better, scorer.scale   # what a score means
  dict(zip(scorer.level_names, r.levels))                     # the quality levels' probabilities of one image

A trained model's score is on the MOS scale of the dataset it was trained on (e.g. [1, 100] for LIVE Challenge;
a DMOS dataset keeps its lower-is-better direction: `higher_is_better` is False); a zero-shot score is
p("Good photo.") on [0, 1]. `Scorer.score_fn` is the model as a pure, differentiable function of crops.

  loaders.py  an exported folder, a training run or a CLIP (zero-shot) -> a `LoadedModel` (model, parameters,
              `Preprocessing`, score map); they depend on the model, CLIP, image and score-mapping code only
              (`mcpf_jax.runs` reads a run's workdir, `mcpf_jax.pretrained` an exported folder): nothing of train/
  scorer.py   `Scorer`: a `LoadedModel` run on files and arrays in fixed-shape batches, decoding ahead
"""

from mcpf_jax.scoring.loaders import (
  DEFAULT_NUM_CROPS,
  DEFAULT_RESIZE,
  NOTE_UPSCALE,
  LoadedModel,
  Preprocessing,
  load_checkpoint,
  load_pretrained,
  load_zero_shot,
)
from mcpf_jax.scoring.scorer import DEFAULT_BATCH_SIZE, Input, Result, Scorer, find_images

__all__ = [
  "DEFAULT_BATCH_SIZE",
  "DEFAULT_NUM_CROPS",
  "DEFAULT_RESIZE",
  "NOTE_UPSCALE",
  "Input",
  "LoadedModel",
  "Preprocessing",
  "Result",
  "Scorer",
  "find_images",
  "load_checkpoint",
  "load_pretrained",
  "load_zero_shot",
]
