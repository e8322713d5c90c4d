"""Export a trained model as a small inference folder, and optionally push it to the Hugging Face Hub.

  python -m mcpf_jax.export --workdir runs/livec [--checkpoint best|latest|N] --output exported/livec \
      [--include_backbone] [--push_to_hub ORG/NAME [--private]] [--clip FOLDER]

The folder (`mcpf_jax.pretrained` describes it) holds the model and preprocessing config, the model's own
parameters in safetensors (no optimizer state), the score mapping (scale, range, direction), the backbone
reference (hub id, revision, fingerprint), the evaluation protocol and a model card (README.md). With
`--include_backbone` the CLIP weights are copied in, in the Hugging Face format, for fully offline use. Load it
with `Scorer.from_pretrained(folder_or_hub_id)` or `score.py --pretrained folder_or_hub_id`.

Prints one JSON line: the folder, its files and their sizes.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import shutil
import sys
from collections.abc import Sequence
from typing import Any

from flax import traverse_util

from mcpf_jax import clip, pretrained, runs
from mcpf_jax.clip import hub
from mcpf_jax.clip.config import HUB_IDS
from mcpf_jax.scoring import Scorer

_HF_SOURCE = re.compile(r"^hf://(?P<repo>[^@]+)@(?P<commit>[^/]+)/(?P<file>.+)$")
# Files of a Hugging Face CLIP folder that the backbone needs besides its weights.
_BACKBONE_FILES = ("config.json", "preprocessor_config.json") + clip.checkpoint.TOKENIZER_FILES


def backbone_reference(config, source: str, fingerprint: str) -> dict[str, Any]:
  """{"source", "hub_id", "revision", "fingerprint"}: where the backbone can be found again.

  The hub id and the exact commit come from the loaded weights' source (hf://repo@commit/file), else from a
  hub id or preset in clip.name (with clip.revision); a backbone loaded from a local folder has no hub id.
  """
  ref = {"source": source, "hub_id": None, "revision": None, "fingerprint": fingerprint}
  m = _HF_SOURCE.match(source)
  if m:
    ref.update(hub_id=m["repo"], revision=m["commit"])
  elif not pathlib.Path(str(config.clip.name)).expanduser().exists() and config.clip.name != "tiny":
    ref.update(hub_id=HUB_IDS.get(config.clip.name, config.clip.name), revision=config.clip.revision)
  return ref


def _backbone_folder(source: str) -> tuple[pathlib.Path, str]:
  """The folder the backbone was loaded from and the weight file's name."""
  m = _HF_SOURCE.match(source)
  if m:
    folder = hub.snapshot(m["repo"], revision=m["commit"], allow_patterns=("config.json", m["file"]),
                          local_files_only=True)  # the files it was loaded from: in the cache, or gone
    return folder, m["file"]
  weights = pathlib.Path(source)
  return weights.parent, weights.name


def _copy_backbone(source: str, target: pathlib.Path) -> list[str]:
  """Copies the backbone's Hugging Face files (weights, config, tokenizer) as they are: the same fingerprint."""
  folder, weights = _backbone_folder(source)
  target.mkdir(parents=True)
  copied = []
  for name in (weights,) + _BACKBONE_FILES:
    if (folder / name).is_file():
      shutil.copyfile(folder / name, target / name)  # follows the hub cache's symlinks to their blobs
      copied.append(name)
  return copied


def _read_json(path: pathlib.Path) -> dict[str, Any] | None:
  return json.loads(path.read_text()) if path.is_file() else None


def export(workdir: str | pathlib.Path, output: str | pathlib.Path, *, checkpoint: str | int = "best",
           include_backbone: bool = False, clip_name: str | None = None, overwrite: bool = False) -> dict[str, Any]:
  """Writes the inference folder of a training run's checkpoint; returns {"output", "step", "files", "bytes"}.

  Raises:
    FileExistsError: `output` exists and is not empty (and not `overwrite`).
    FileNotFoundError / ValueError: as `Scorer.from_checkpoint`.
  """
  output = pathlib.Path(output).expanduser()
  if output.exists() and any(output.iterdir()) and not overwrite:
    raise FileExistsError(f"{output}: exists and is not empty; choose a new --output (or --overwrite)")
  workdir, checkpoint = runs.locate(workdir, checkpoint)
  scorer = Scorer.from_checkpoint(workdir, checkpoint, clip_name=clip_name, num_workers=0)
  step_dir = pathlib.Path(scorer.info["checkpoint"])
  meta = runs.read_meta(step_dir)
  config = runs.run_config(workdir, meta)
  trained = set(runs.read_params(step_dir))
  flat = traverse_util.flatten_dict(scorer.params, sep="/")
  # The model's own leaves (trained or drawn from the seed at build) and any trained backbone leaf.
  own = {k: v for k, v in flat.items() if not k.startswith("clip/") or k in trained}

  run = runs.read_run(workdir) or {}
  eval_json = _read_json(workdir / "eval.json")
  summary = _read_json(workdir / "train_summary.json")
  score_map = scorer.score_map
  # from_checkpoint checked that the backbone loaded (info["backbone"]) has the fingerprint the run trained on.
  source = scorer.info["backbone"]
  backbone = dict(backbone_reference(config, source, meta["backbone"]["fingerprint"]), included=include_backbone)
  record = {
      "format": pretrained.FORMAT, "format_version": pretrained.FORMAT_VERSION,
      "model": json.loads(config.model.to_json_best_effort()), "seed": int(config.seed),
      "clip": {"name": config.clip.name, "revision": config.clip.revision, "dtype": config.clip.dtype},
      "backbone": backbone,
      "preprocessing": {"resize": scorer.preprocessing.resize, "image_size": scorer.preprocessing.image_size,
                        "num_crops": scorer.preprocessing.num_crops,
                        "protocol": "short side resized to `resize` (aspect kept), `num_crops` crops of "
                                    "`image_size` on an even grid, their scores averaged"},
      "score": {"low": score_map.low, "high": score_map.high, "higher_is_better": score_map.higher_is_better,
                "train_low01": score_map.train_low01, "train_high01": score_map.train_high01,
                "num_levels": score_map.num_levels,
                "score_range": list(scorer.score_range), "scale": scorer.scale, "dataset": scorer.dataset},
      "training": {"step": scorer.info["step"], "checkpoint": str(checkpoint), "dataset": run.get("dataset"),
                   "split": run.get("split"), "init_from": run.get("init_from"),
                   "eval": eval_json, "test": (summary or {}).get("test")},
  }
  output.mkdir(parents=True, exist_ok=True)
  if overwrite:
    for stale in (pretrained.BACKBONE_DIR,):
      if (output / stale).exists():
        shutil.rmtree(output / stale)
  pretrained.write_params(output / pretrained.WEIGHTS_FILE, own)
  (output / pretrained.CONFIG_FILE).write_text(json.dumps(record, indent=1) + "\n")
  (output / pretrained.CARD_FILE).write_text(model_card(record, num_params=sum(int(v.size) for v in own.values())))
  if include_backbone:
    _copy_backbone(source, output / pretrained.BACKBONE_DIR)
  files = {str(p.relative_to(output)): p.stat().st_size for p in sorted(output.rglob("*")) if p.is_file()}
  return {"output": str(output), "step": scorer.info["step"], "files": files, "bytes": sum(files.values())}


def _metrics_table(metrics: dict[str, Any] | None) -> str:
  if not metrics:
    return "not evaluated yet (run `python eval.py --workdir WORKDIR` before exporting)"
  keys = [k for k in ("srcc", "plcc", "plcc_logistic", "krcc", "rmse", "num_images") if k in metrics]
  head = "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n"
  cells = [f"{metrics[k]:.4f}" if isinstance(metrics[k], float) else str(metrics[k]) for k in keys]
  return head + "| " + " | ".join(cells) + " |"


def model_card(record: dict[str, Any], *, num_params: int) -> str:
  """README.md: Hugging Face model card metadata (YAML) and what a user needs to know to use the scores."""
  from huggingface_hub import ModelCardData  # pylint: disable=g-import-not-at-top
  score, prep, back, train = record["score"], record["preprocessing"], record["backbone"], record["training"]
  name = record["model"].get("name", "mcpf")
  data = ModelCardData(library_name="mcpf_jax", base_model=back["hub_id"],
                       tags=["image-quality-assessment", "no-reference-iqa", "clip", "jax", "flax", name])
  direction = "higher is better" if score["higher_is_better"] else "LOWER is better (a DMOS scale)"
  ds, split = train.get("dataset") or {}, train.get("split") or {}
  ev = train.get("eval")  # eval.py's eval.json; else train.py's final test evaluation
  part = lambda e: e.get("part", e.get("split"))  # "split" in results written before the key was renamed
  if ev:
    eval_what = (f"`eval.py` on {ev.get('dataset')} ({part(ev)} part, checkpoint step "
                 f"{ev.get('checkpoint_step')}; trained on {ev.get('trained_on')}):")
  elif train.get("test"):
    ev = train["test"]
    eval_what = f"`train.py`'s test evaluation at the end of training ({ev.get('dataset')}, {part(ev)} part):"
  else:
    eval_what = ""
  backbone_where = ("included in `clip/` (Hugging Face CLIP format)" if back["included"] else
                    f"not included: `{back['hub_id']}` (revision `{back['revision'] or 'main'}`) from the Hugging Face "
                    "Hub or its cache, or `--clip FOLDER`" if back["hub_id"] else
                    "not included, and it has no hub id: give it with `--clip FOLDER`")
  return f"""---
{data.to_yaml()}
---

# {name} no-reference image quality model (mcpf_jax)

A CLIP prompt-learning model ({name}) that predicts the quality people would give a photo, from the photo alone
(no reference). {num_params:,} parameters of its own (`model.safetensors`) on a frozen CLIP backbone.

## What the score means

- Scale: **{score['scale']}**, {direction}.
- Range: **[{score['score_range'][0]:g}, {score['score_range'][1]:g}]**: the model's output is always in it (the
  training split's MOS range, or the dataset's nominal scale).
- Scores of models trained on different datasets are on different scales; compare them by rank, not value.

## Training

- Dataset: `{ds.get('name', score.get('dataset'))}` (builder version {ds.get('version', '?')}, \
{ds.get('num_records', '?')} images,
  fingerprint `{ds.get('fingerprint', '?')}`).
- Split: protocol `{split.get('protocol', '?')}`, seed {split.get('split_seed', '?')}: \
{split.get('num_train', '?')} train /
  {split.get('num_val', '?')} validation / {split.get('num_test', '?')} test images, split by content.
- Checkpoint: step {train['step']} ({train['checkpoint']}).

## Evaluation

{eval_what}

{_metrics_table(ev)}

Protocol: {prep['protocol']}; resize = {prep['resize']}, image_size = {prep['image_size']}, \
num_crops = {prep['num_crops']}.

## Backbone

CLIP `{back['hub_id'] or back['source']}`, fingerprint `{back['fingerprint']}` (checked on load): {backbone_where}.

## Use

```bash
python score.py --pretrained THIS_FOLDER_OR_HUB_ID --format json photos/
```

```python
from mcpf_jax.scoring import Scorer
scorer = Scorer.from_pretrained("THIS_FOLDER_OR_HUB_ID")
print(scorer.score(["photo.jpg"])[0].score, scorer.score_range, scorer.higher_is_better)
```
"""


def push_to_hub(folder: str | pathlib.Path, repo_id: str, *, private: bool = False) -> str:
  """Uploads the folder as a model repo (its README.md is the card); returns the commit URL.

  The one hub write of the project (reads go through clip.hub.snapshot)."""
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  api = huggingface_hub.HfApi()
  api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
  info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                           commit_message="Upload mcpf_jax IQA model")
  return str(getattr(info, "commit_url", info))


def main(argv: Sequence[str] | None = None) -> int:
  # argparse, as score.py (the inference side; see the note there)
  p = argparse.ArgumentParser(prog="python -m mcpf_jax.export", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="the training run's workdir (or a checkpoints/<step> folder)")
  p.add_argument("--checkpoint", default="best", help="best | latest | a step number (as in eval.py)")
  p.add_argument("--output", required=True, help="the folder to write (new or empty)")
  p.add_argument("--include_backbone", action="store_true", help="copy the CLIP weights in (fully offline use)")
  p.add_argument("--clip", default=None, help="where the run's CLIP backbone is now, if it moved")
  p.add_argument("--overwrite", action="store_true", help="write into an existing, non-empty --output")
  p.add_argument("--push_to_hub", default=None, metavar="ORG/NAME", help="upload the folder as this model repo")
  p.add_argument("--private", action="store_true", help="with --push_to_hub: a private repo")
  args = p.parse_args(argv)
  try:
    result = export(args.workdir, args.output, checkpoint=args.checkpoint, include_backbone=args.include_backbone,
                    clip_name=args.clip, overwrite=args.overwrite)
  except (FileExistsError, FileNotFoundError, ValueError) as e:
    print(f"export: {e}", file=sys.stderr)
    return 1
  if args.push_to_hub:
    result["pushed"] = push_to_hub(args.output, args.push_to_hub, private=args.private)
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
