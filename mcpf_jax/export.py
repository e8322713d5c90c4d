"""Export a trained model as a small inference folder, and optionally push it to the Hugging Face Hub.

  python -m mcpf_jax.export --workdir runs/livec [--checkpoint best|latest|N] --output exported/livec \
      [--include_backbone] [--stablehlo] [--onnx] [--push_to_hub ORG/NAME [--private]] [--clip FOLDER]

The folder (`mcpf_jax.pretrained` describes it) holds the model and preprocessing config, the model's own
parameters in safetensors (no optimizer state), the score mapping (scale, range, direction), the backbone
reference (hub id, revision, fingerprint), the evaluation protocol and a model card (README.md). With
`--include_backbone` the CLIP weights are copied in, in the Hugging Face format, for fully offline use. Load it
with `Scorer.from_pretrained(folder_or_hub_id)` or `score.py --pretrained folder_or_hub_id`.

With `--stablehlo` the folder also holds `model.stablehlo`: the whole scorer (parameters inside) compiled to
StableHLO by `jax.export`, for CPU, CUDA GPUs and TPUs in one artifact, with a symbolic batch size. Its input is the
evaluation crops (`crops`, uint8 [batch, num_crops, S, S, 3], as `mcpf_jax.images.eval_crops` makes them with the
folder's `preprocessing`), its output each image's score on the model's scale (`score`, float32 [batch]);
`mcpf_jax.compiled` runs it with jax alone, without this package's model or CLIP code. With `--onnx`, `model.onnx`:
the same function and contract (inputs `crops`, outputs `score`, a symbolic batch), converted by jax2onnx, for
ONNX Runtime.

Prints one JSON line: the folder, its files and their sizes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import re
import shutil
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath
from flax import traverse_util

from mcpf_jax import clip, pretrained, resolve, rundir, runs
from mcpf_jax.clip import hub
from mcpf_jax.clip.config import HUB_IDS
from mcpf_jax.scoring import Scorer

_HF_SOURCE = re.compile(r"^hf://(?P<repo>[^@]+)@(?P<commit>[^/]+)/(?P<file>.+)$")
# A snapshot folder in a Hugging Face cache: <cache>/models--<org>--<name>/snapshots/<commit> (the hub forbids
# "--" in repo names, so each "--" of the folder name is a "/" of the repo id).
_HUB_CACHE_FOLDER = re.compile(r"(?:^|/)models--(?P<repo>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})/?$")
# Files of a Hugging Face CLIP folder that the backbone needs besides its weights.
_BACKBONE_FILES = ("config.json", "preprocessor_config.json") + clip.checkpoint.TOKENIZER_FILES
# An OpenCLIP backbone (mcpf_jax.clip.openclip): its config beside its weights, nothing else (its tokenizer is ours).
_OPENCLIP_WEIGHTS = clip.openclip.WEIGHT_FILES
_WEIGHT_FILES = clip.checkpoint.WEIGHT_FILES + _OPENCLIP_WEIGHTS
STABLEHLO_FILE = "model.stablehlo"
ONNX_FILE = "model.onnx"
ONNX_OPSET = 23
PORTABLE_PLATFORMS = ("cpu", "cuda", "tpu")  # jax.export's names (a CUDA GPU is "cuda")


def stablehlo(scorer: Scorer, platforms: Sequence[str] = PORTABLE_PLATFORMS) -> tuple[bytes, dict[str, Any]]:
  """The scorer serialised by `jax.export` (see the module docstring), and its entry for config.json."""
  prep = scorer.preprocessing
  size, crops = prep.image_size, prep.num_crops
  (batch,) = jax.export.symbolic_shape("batch")
  argument = jax.ShapeDtypeStruct((batch, crops, size, size, 3), jnp.uint8)
  exported = jax.export.export(jax.jit(scorer.crops_fn(portable=True)), platforms=tuple(platforms))(argument)
  info = {"file": STABLEHLO_FILE, "platforms": list(exported.platforms),
          "calling_convention_version": exported.calling_convention_version, "jax_version": jax.__version__,
          **_contract(scorer)}
  return bytes(exported.serialize()), info


def _is_local_name(name: str) -> bool:
  """A clip.name that names a folder on this machine (rather than a hub id, a preset or a generated backbone)."""
  path = pathlib.Path(name).expanduser()
  return path.is_absolute() or name.startswith((".", "~")) or path.exists()


def _hub_cache_reference(folder: pathlib.Path) -> tuple[str, str] | None:
  """(hub id, commit) of a snapshot folder of a Hugging Face cache, else None."""
  m = _HUB_CACHE_FOLDER.search(folder.expanduser().absolute().as_posix())
  return (m["repo"].replace("--", "/"), m["commit"]) if m else None


def backbone_reference(config, source: str, fingerprint: str, *,
                       folder: pathlib.Path | None = None) -> dict[str, Any]:
  """{"hub_id", "revision", "weights", "fingerprint"}: how the backbone is found again, with no local path in it.

  The hub id and the exact commit come from the loaded weights' source (hf://repo@commit/file); else from the
  local `folder` it was loaded from when that is a snapshot in a Hugging Face cache; else from a hub id or preset
  in clip.name (with clip.revision: the run trained on it, and the weights given instead have its fingerprint).
  A backbone with none of these (a local folder, a generated backbone such as the smoke run's tiny CLIP) has no hub
  id: only its fingerprint.
  """
  ref = {"hub_id": None, "revision": None, "weights": None, "fingerprint": fingerprint}
  m = _HF_SOURCE.match(source)
  if m:
    return dict(ref, hub_id=m["repo"], revision=m["commit"], weights=m["file"])
  if folder is not None:
    ref["weights"] = next((w for w in _WEIGHT_FILES if (folder / w).is_file()), None)
    cached = _hub_cache_reference(folder)
    if cached:
      return dict(ref, hub_id=cached[0], revision=cached[1])
  name = str(config.clip.name)
  if name not in runs.BACKBONES and not _is_local_name(name):
    ref.update(hub_id=HUB_IDS.get(name, name), revision=config.clip.revision)
  return ref


def _backbone_folder(source: str, loaded_from: pathlib.Path | None) -> tuple[pathlib.Path, str]:
  """The folder the backbone was loaded from and the weight file's name."""
  m = _HF_SOURCE.match(source)
  if m:
    config = clip.openclip.CONFIG if m["file"] in _OPENCLIP_WEIGHTS else "config.json"
    folder = hub.snapshot(m["repo"], revision=m["commit"], allow_patterns=(config, m["file"]),
                          local_files_only=True)  # the files it was loaded from: in the cache, or gone
    return folder, m["file"]
  if loaded_from is not None:  # the folder as given: a hub cache's snapshot links its files to blobs/<hash>
    return loaded_from, next(w for w in _WEIGHT_FILES if (loaded_from / w).is_file())
  weights = pathlib.Path(source)
  return weights.parent, weights.name


def _local_path_strings() -> tuple[str, ...]:
  """Absolute paths of this machine that must not appear in an exported file (home, working folder, temp)."""
  import tempfile  # pylint: disable=g-import-not-at-top
  places = {pathlib.Path.home(), pathlib.Path.cwd(), pathlib.Path(tempfile.gettempdir())}
  return tuple(sorted({str(p) for p in places} | {str(p.resolve()) for p in places}, key=len, reverse=True))


def _looks_local(text: str, places: Sequence[str]) -> bool:
  """An absolute or home-relative file path, a file:// URL, or any text holding one of `places`."""
  if text.startswith(("/", "~", "file:")) or re.match(r"^[A-Za-z]:[\\/]", text):
    return True
  return any(p != "/" and p in text for p in places)


def without_local_paths(data: Any, places: Sequence[str] | None = None) -> Any:
  """JSON data with every string that names a local path (`_looks_local`) replaced by None: what is exported
  may be published (--push_to_hub), and a path of the exporting machine means nothing elsewhere."""
  places = _local_path_strings() if places is None else places
  if isinstance(data, dict):
    return {k: without_local_paths(v, places) for k, v in data.items()}
  if isinstance(data, (list, tuple)):
    return [without_local_paths(v, places) for v in data]
  if isinstance(data, str) and _looks_local(data, places):
    return None
  return data


def _write(path: pathlib.Path, data: bytes) -> None:
  """A new file with the ordinary mode (0666 less the umask), also where --overwrite replaces an older one."""
  path.unlink(missing_ok=True)
  path.write_bytes(data)


def _copy_backbone(source: str, loaded_from: pathlib.Path | None, target: pathlib.Path) -> list[str]:
  """Copies the backbone's Hugging Face files (weights, config, tokenizer): the weights as they are (the same
  fingerprint), the JSON files without local paths (transformers records e.g. `_name_or_path`)."""
  folder, weights = _backbone_folder(source, loaded_from)
  target.mkdir(parents=True)
  copied = []
  for name in (weights,) + ((clip.openclip.CONFIG,) if weights in _OPENCLIP_WEIGHTS else _BACKBONE_FILES):
    if not (folder / name).is_file():
      continue
    data = (folder / name).read_bytes()  # follows the hub cache's symlinks to their blobs
    if name.endswith(".json"):
      raw = json.loads(data)
      clean = without_local_paths(raw)
      if clean != raw:
        data = (json.dumps(clean, indent=2) + "\n").encode()
    _write(target / name, data)
    copied.append(name)
  return copied


def _read_json(path: epath.Path) -> dict[str, Any] | None:
  return rundir.read_json(path)


def _contract(scorer: Scorer) -> dict[str, Any]:
  prep = scorer.preprocessing
  return {"input": {"name": "crops", "dtype": "uint8",
                    "shape": ["batch", prep.num_crops, prep.image_size, prep.image_size, 3]},
          "output": {"name": "score", "dtype": "float32", "shape": ["batch"]}}


def onnx_model(scorer: Scorer) -> tuple[bytes, dict[str, Any]]:
  """The scorer as an ONNX model (jax2onnx; the contract of `stablehlo`), and its entry for config.json.

  Raises:
    ValueError: jax2onnx is not installed (the message says how to install it).
  """
  # jax2onnx logs a traceback for each optional plugin whose library (equinox, dm-pix) is absent, and onnx_ir a
  # warning per untyped shape constant: noise about what the export does not use.
  quiet = [logging.getLogger(name) for name in ("jax2onnx", "onnx_ir")]
  levels = [q.level for q in quiet]
  for q in quiet:
    q.setLevel(logging.ERROR)
  try:
    return _onnx_model(scorer)
  finally:
    for q, level in zip(quiet, levels):
      q.setLevel(level)


def _onnx_model(scorer: Scorer) -> tuple[bytes, dict[str, Any]]:
  try:
    import jax2onnx  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError("--onnx needs jax2onnx: pip install onnx onnx-ir onnxruntime && pip install --no-deps "
                     "jax2onnx==0.17.1 (without --no-deps its orbax-checkpoint<0.11.37 pin would downgrade the "
                     f"orbax-checkpoint this package needs) ({e})") from e
  prep = scorer.preprocessing
  (batch,) = jax.export.symbolic_shape("batch")
  argument = jax.ShapeDtypeStruct((batch, prep.num_crops, prep.image_size, prep.image_size, 3), jnp.uint8)
  # jax2onnx converts jax primitives, and patches Flax Linen modules while it traces a function that calls them;
  # those patches break the model's static shape checks. The model's jaxpr, replayed, holds primitives only.
  closed = jax.make_jaxpr(scorer.crops_fn(portable=True))(argument)

  def replay(crops):
    return jax.core.eval_jaxpr(closed.jaxpr, closed.consts, crops)[0]

  contract = _contract(scorer)
  model = jax2onnx.to_onnx(replay, [jax.ShapeDtypeStruct(("batch",) + argument.shape[1:], jnp.uint8)],
                           model_name="mcpf_jax_scorer", opset=ONNX_OPSET, input_names=["crops"],
                           output_names=["score"])
  info = {"file": ONNX_FILE, "opset": ONNX_OPSET, "converter": "jax2onnx (replaying the scorer's jaxpr)",
          **contract}
  return model.SerializeToString(), info


def export(workdir: str | os.PathLike[str], output: str | pathlib.Path, *, checkpoint: str | int = "best",
           include_backbone: bool = False, clip_name: str | None = None, overwrite: bool = False,
           with_stablehlo: bool = False, with_onnx: bool = False) -> dict[str, Any]:
  """Writes the inference folder of a training run's checkpoint; returns {"output", "step", "files", "bytes"}.

  `with_stablehlo`, `with_onnx`: also write the compiled scorer, `model.stablehlo`, and the ONNX model, `model.onnx`
  (see the module docstring).

  Raises:
    FileExistsError: `output` exists and is not empty (and not `overwrite`).
    FileNotFoundError / ValueError: as `Scorer.from_checkpoint`.
  """
  output = pathlib.Path(output).expanduser()
  if output.exists() and any(output.iterdir()) and not overwrite:
    raise FileExistsError(f"{output}: exists and is not empty; choose a new --output (or --overwrite)")
  workdir, checkpoint = runs.locate(workdir, checkpoint)
  scorer = Scorer.from_checkpoint(workdir, checkpoint, clip_name=clip_name, num_workers=0)
  step_dir = rundir.path(scorer.info["checkpoint"])
  meta = runs.read_meta(step_dir)
  run = runs.read_run(workdir) or {}
  config = resolve.saved_config(run or None, meta)
  trained = set(runs.read_params(step_dir))
  flat = traverse_util.flatten_dict(scorer.params, sep="/")
  # The model's own leaves (trained or drawn from the seed at build) and any trained backbone leaf.
  own = {k: v for k, v in flat.items() if not k.startswith("clip/") or k in trained}

  eval_json = _read_json(workdir / rundir.EVAL_FILE)
  summary = _read_json(workdir / rundir.SUMMARY_FILE)
  score_map = scorer.score_map
  # from_checkpoint checked that the backbone loaded (info["backbone"]) has the fingerprint the run trained on.
  source = scorer.info["backbone"]
  name = str(clip_name or config.clip.name)  # what the backbone was loaded from (runs.load_clip)
  loaded_from = (pathlib.Path(source).parent if name in runs.BACKBONES else
                 pathlib.Path(name).expanduser() if pathlib.Path(name).expanduser().is_dir() else None)
  backbone = dict(backbone_reference(config, source, meta["backbone"]["fingerprint"], folder=loaded_from),
                  included=include_backbone, path=pretrained.BACKBONE_DIR if include_backbone else None)
  dataset = {k: v for k, v in (run.get("dataset") or {}).items() if k != "path"}  # where it was on this machine
  record = {
      "format": pretrained.FORMAT, "format_version": pretrained.FORMAT_VERSION,
      "model": json.loads(config.model.to_json_best_effort()), "seed": int(config.seed),
      "clip": {"name": None if _is_local_name(str(config.clip.name)) else config.clip.name,
               "revision": config.clip.revision, "dtype": config.clip.dtype},
      "backbone": backbone,
      "preprocessing": {"resize": scorer.preprocessing.resize, "image_size": scorer.preprocessing.image_size,
                        "num_crops": scorer.preprocessing.num_crops,
                        "protocol": "short side resized to `resize` (aspect kept), `num_crops` crops of "
                                    "`image_size` on an even grid, their scores averaged"},
      "score": {"low": score_map.low, "high": score_map.high, "higher_is_better": score_map.higher_is_better,
                "train_low01": score_map.train_low01, "train_high01": score_map.train_high01,
                "num_levels": score_map.num_levels,
                "score_range": list(scorer.score_range), "scale": scorer.scale, "dataset": scorer.dataset},
      "training": {"step": scorer.info["step"], "checkpoint": str(checkpoint), "dataset": dataset or None,
                   "split": run.get("split"), "init_from": run.get("init_from"),
                   "eval": eval_json, "test": (summary or {}).get("test")},
  }
  portable = {}
  if with_stablehlo:
    portable[STABLEHLO_FILE], record["stablehlo"] = stablehlo(scorer)
  if with_onnx:
    portable[ONNX_FILE], record["onnx"] = onnx_model(scorer)
  record = without_local_paths(record)
  output.mkdir(parents=True, exist_ok=True)
  if overwrite:
    for stale in (pretrained.BACKBONE_DIR,):
      if (output / stale).exists():
        shutil.rmtree(output / stale)
  _write(output / pretrained.WEIGHTS_FILE, pretrained.params_bytes(own))
  _write(output / pretrained.CONFIG_FILE, (json.dumps(record, indent=1) + "\n").encode())
  card = model_card(record, num_params=sum(int(v.size) for v in own.values()))
  _write(output / pretrained.CARD_FILE, card.encode())
  for name in (STABLEHLO_FILE, ONNX_FILE):
    if name in portable:
      _write(output / name, portable[name])
    elif overwrite and (output / name).exists():
      (output / name).unlink()  # a stale artifact of an earlier export would not match these weights
  if include_backbone:
    _copy_backbone(source, loaded_from, output / pretrained.BACKBONE_DIR)
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
  if back["included"]:
    backbone_where = f"included in `{back.get('path') or 'clip'}/` (Hugging Face CLIP format)"
  elif back["hub_id"]:
    backbone_where = (f"not included: `{back['hub_id']}` (revision `{back['revision'] or 'main'}`) from the "
                      "Hugging Face Hub or its cache, or `--clip FOLDER`")
  else:
    backbone_where = "not included, and it has no hub id: give its folder with `--clip FOLDER`"
  backbone_name = f"`{back['hub_id']}`" if back["hub_id"] else "(a local CLIP, not on the Hugging Face Hub)"
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

CLIP {backbone_name}, fingerprint `{back['fingerprint']}` (checked on load): {backbone_where}.

## Use

```bash
python score.py --pretrained THIS_FOLDER_OR_HUB_ID --format json photos/
```

```python
from mcpf_jax.scoring import Scorer
scorer = Scorer.from_pretrained("THIS_FOLDER_OR_HUB_ID")
print(scorer.score(["photo.jpg"])[0].score, scorer.score_range, scorer.higher_is_better)
```
{_portable_card(record)}"""


def _portable_card(record: dict[str, Any]) -> str:
  """The model card's section on the folder's model.onnx / model.stablehlo, if it has them."""
  if not record.get("onnx") and not record.get("stablehlo"):
    return ""
  prep = record["preprocessing"]
  shape = f"[batch, {prep['num_crops']}, {prep['image_size']}, {prep['image_size']}, 3]"
  text = (f"\n## Without mcpf_jax's model code\n\nInput `crops`: uint8 {shape}, each image's evaluation crops (short "
          f"side resized to {prep['resize']}, {prep['num_crops']} crops of {prep['image_size']} on an even grid: "
          "`mcpf_jax.images.eval_crops`); output `score`: float32 [batch], on the scale above.\n")
  if record.get("onnx"):
    text += f"""
```python
import numpy as np, onnxruntime
session = onnxruntime.InferenceSession("{record['onnx']['file']}")
(score,) = session.run(["score"], {{"crops": crops}})   # crops: np.uint8 {shape}
```
"""
  if record.get("stablehlo"):
    platforms = ", ".join(record["stablehlo"]["platforms"])
    text += f"""
```bash
python -m mcpf_jax.compiled THIS_FOLDER photos/   # {record['stablehlo']['file']}: jax.export, for {platforms}
```
"""
  return text


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
  p.add_argument("--stablehlo", action="store_true", help="also write model.stablehlo: the scorer compiled by "
                 "jax.export for CPU, GPU and TPU (run it with python -m mcpf_jax.compiled)")
  p.add_argument("--onnx", action="store_true", help="also write model.onnx: the scorer for ONNX Runtime (needs "
                 "jax2onnx)")
  p.add_argument("--clip", default=None, help="where the run's CLIP backbone is now, if it moved")
  p.add_argument("--overwrite", action="store_true", help="write into an existing, non-empty --output")
  p.add_argument("--push_to_hub", default=None, metavar="ORG/NAME", help="upload the folder as this model repo")
  p.add_argument("--private", action="store_true", help="with --push_to_hub: a private repo")
  args = p.parse_args(argv)
  try:
    result = export(args.workdir, args.output, checkpoint=args.checkpoint, include_backbone=args.include_backbone,
                    clip_name=args.clip, overwrite=args.overwrite, with_stablehlo=args.stablehlo,
                    with_onnx=args.onnx)
  except (FileExistsError, FileNotFoundError, ValueError) as e:
    print(f"export: {e}", file=sys.stderr)
    return 1
  if args.push_to_hub:
    result["pushed"] = push_to_hub(args.output, args.push_to_hub, private=args.private)
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
