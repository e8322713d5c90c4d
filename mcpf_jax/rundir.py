"""The folder of a training run, on a local disk or in a bucket: its layout and the way its files are written.

A run folder (`--workdir`) is a local path (`runs/livec`, `~/runs/livec`, NFS alike) or an object-store URL
(`gs://bucket/runs/livec`). Every module reaches it through `path()`, an `etils.epath.Path` (orbax's and TFDS's own
path layer: the local file system, or gcsfs for `gs://`), so local folders and buckets are one code path; nothing
here turns a URL into a local name (pathlib would make `gs://b/run` the local folder `gs:/b/run`).

Layout of `<workdir>` (the names are this module's constants; every writer and reader takes them from here):
  run.json, split.json   the run's identity (mcpf_jax.train.identity), written once at its start
  checkpoints/<step>/    orbax checkpoints (mcpf_jax.runs describes the items); `config.checkpoint_dir` may put
                         them elsewhere (another folder or bucket)
  tensorboard/           TensorBoard event files
  train_summary.json, test_predictions.csv        written at the end of training
  eval.json, eval_predictions.csv, eval_scatter.png   written by eval.py
  protocol.json, split_<s>/                        the N-split protocol: its summary and each split's run folder
  <name>_clip/           a backbone generated on first use, e.g. the smoke run's tiny_clip/ (a local run folder
                         only: see `generated_backbone_dir`)
  data/                  the dataset when data.data_dir is "" (a local run folder only: see `local_cache`)
A dataset may be read from a bucket too (data.data_dir=gs://...; built locally, then copied there).
Exports (`python -m mcpf_jax.export --output DIR`) are written to a local folder outside the run folder.

Small files are written whole or not at all (`write_atomic`): locally a temporary file in the same folder, fsync'd,
then `os.replace`; on a bucket one object upload, which readers see entire or not at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any

from etils import epath

RUN_FILE = "run.json"
SPLIT_FILE = "split.json"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
SUMMARY_FILE = "train_summary.json"
TEST_PREDICTIONS_FILE = "test_predictions.csv"
EVAL_FILE = "eval.json"
EVAL_PREDICTIONS_FILE = "eval_predictions.csv"
EVAL_SCATTER_FILE = "eval_scatter.png"
PROTOCOL_FILE = "protocol.json"
GENERATED_CLIP = "{name}_clip"  # a generated backbone's folder: "tiny" -> tiny_clip
DATA = "data"

# Object stores a run folder may live in (tested against a local GCS-protocol server; orbax and tensorstore write
# gs:// natively, gcsfs serves etils.epath).
REMOTE_SCHEMES = ("gs",)
# Where a run kept in a bucket puts what must be a local file (a generated backbone, a dataset built for it).
CACHE_ENV = "MCPF_JAX_CACHE"
DEFAULT_CACHE = "~/.cache/mcpf_jax"

PathLike = str | os.PathLike[str]


def scheme(p: PathLike) -> str | None:
  """The URL scheme of `p` ("gs"), or None for a local path.

  Raises:
    ValueError: a URL of a scheme no run folder can use (naming it and the schemes that work).
  """
  s = os.fspath(p)
  if "://" not in s:
    return None
  name = s.split("://", 1)[0]
  if name not in REMOTE_SCHEMES:
    raise ValueError(f"{s}: a run folder (or checkpoint_dir) on {name}:// is not supported; use a local path or "
                     + " or ".join(f"{r}://bucket/path" for r in REMOTE_SCHEMES))
  if not s.split("://", 1)[1].strip("/"):
    raise ValueError(f"{s}: no bucket named; expected {name}://bucket/path")
  return name


def supported(p: PathLike) -> bool:
  """Whether `p` may be a run folder: a local path or a URL of REMOTE_SCHEMES naming a bucket."""
  try:
    scheme(p)
  except ValueError:
    return False
  return True


WHERE = "a local folder or " + " or ".join(f"{r}://bucket/path" for r in REMOTE_SCHEMES)


def is_remote(p: PathLike) -> bool:
  """True for an object-store URL (gs://...), False for a local path."""
  return scheme(p) is not None


def path(p: PathLike) -> epath.Path:
  """A run folder or a file in it as an epath.Path: `~` expanded for a local path, a URL kept as it is."""
  if is_remote(p):
    return epath.Path(os.fspath(p))
  return epath.Path(os.path.expanduser(os.fspath(p)))


def absolute(p: PathLike) -> epath.Path:
  """`path(p)`, made absolute when local (without resolving links, as pathlib's absolute()); a URL as it is."""
  if is_remote(p):
    return path(p)
  return epath.Path(pathlib.Path(os.fspath(path(p))).absolute())


def checkpoint_dir(workdir: PathLike, configured: str | None = None) -> epath.Path:
  """Where a run's checkpoints are: `configured` (config.checkpoint_dir) when set, else <workdir>/checkpoints."""
  if configured:
    return absolute(configured)
  return absolute(workdir) / CHECKPOINTS


def write_atomic(target: PathLike, data: str | bytes) -> None:
  """Writes `target` whole or not at all: locally a temporary file in the same folder (created if need be),
  fsync'd, then os.replace; on a bucket a single object upload (readers see the old object or the new one, never
  a part)."""
  target = path(target)
  raw = data.encode("utf-8") if isinstance(data, str) else data
  if is_remote(target):
    target.write_bytes(raw)
    return
  target.parent.mkdir(parents=True, exist_ok=True)  # as on a bucket, where an object's name makes its folder
  tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
  with open(tmp, "wb") as f:
    f.write(raw)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, target)


def write_json_atomic(target: PathLike, value: Any, *, indent: int = 1) -> None:
  """`value` as JSON (with a final newline), written by `write_atomic`."""
  write_atomic(target, json.dumps(value, indent=indent) + "\n")


def read_json(source: PathLike) -> Any | None:
  """The JSON in `source`, or None when there is no such file.

  Raises:
    ValueError: the file is not valid JSON (naming it).
  """
  source = path(source)
  if not source.exists():
    return None
  try:
    return json.loads(source.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{source}: not valid JSON ({e}); the file is damaged") from e


def local_cache(*parts: str) -> pathlib.Path:
  """A local folder for what a run kept in a bucket needs on the local disk: $MCPF_JAX_CACHE (default
  ~/.cache/mcpf_jax), joined with `parts`."""
  return pathlib.Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser().joinpath(*parts)


def generated_backbone_dir(workdir: PathLike, name: str, recipe: dict[str, Any]) -> pathlib.Path:
  """Where a run's generated backbone `name` goes (`runs.GeneratedBackbone`): <workdir>/<name>_clip for a local run
  folder; for a run in a bucket a local folder named by its recipe (`recipe`: what its weights are a function of),
  since the CLIP loader reads local files. The run's checkpoints check the backbone's fingerprint, so any copy is it."""
  folder = GENERATED_CLIP.format(name=name)
  if not is_remote(workdir):
    return pathlib.Path(os.fspath(path(workdir))) / folder
  digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]
  return local_cache(folder, digest)


def data_dir(workdir: PathLike, configured: str | None) -> epath.Path:
  """config.data.data_dir, or when it is "": <workdir>/data for a local run folder (self-contained runs such as
  smoke), the local cache's data/ for a run kept in a bucket."""
  if configured:
    return path(configured)
  if is_remote(workdir):
    return epath.Path(local_cache(DATA))
  return path(workdir) / DATA
