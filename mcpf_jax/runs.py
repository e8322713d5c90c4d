"""A training run as inference reads it: its config, its checkpoints' trainable parameters, its CLIP.

Nothing here builds an optimizer or reads a dataset, and nothing imports `mcpf_jax.train`: the Scorer and the
exporter restore a trained model from a workdir with this module alone. The training side
(`mcpf_jax.train.checkpoints`) writes the layout described here and takes its item names and retention policy
from here, so the two cannot drift apart.

Checkpoint layout (LAYOUT = 2), `<checkpoint_dir>/<step>/` (`<workdir>/checkpoints` unless config.checkpoint_dir
says otherwise; the run folder's own layout is `mcpf_jax.rundir`'s):
  params   the trainable parameters alone (orbax StandardSave of the trainable subtree): all inference needs
  opt      {"opt": the optimizer state, "step"}: only a resumed training run reads it
  meta     JSON: backbone {source, fingerprint}, dataset, label_transform, split sizes, config, layout
  metrics  the validation SRCC orbax ranks checkpoints by (where there is one)
Layout 1 (before params, opt and meta were saved apart) had one item `state` = {"params", "opt", "step"}; it is
still read: its "params" subtree is restored from the item's own metadata (the optimizer state is restored
alongside, it is prompt-sized, and dropped), so no optimizer is built to read it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import pathlib
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from mcpf_jax import clip, rundir

log = logging.getLogger("mcpf_jax")

LAYOUT = 2
PARAMS, OPT, META = "params", "opt", "meta"
OLD_STATE = "state"  # layout 1: {"params", "opt", "step"} in one item
BEST_METRIC = "val_srcc"
RUN_FILE = rundir.RUN_FILE  # written by mcpf_jax.train.identity at a run's start


def best_metric(metrics: Mapping[str, Any]) -> float:
  # A NaN SRCC (constant predictions) ranks last instead of making the sort order undefined.
  value = float(metrics[BEST_METRIC])
  return value if math.isfinite(value) else -math.inf


def manager_options(keep: int = 3, *, read_only: bool = False) -> ocp.CheckpointManagerOptions:
  """Keep the last `keep` checkpoints and the best by validation SRCC (`best_step()`)."""
  # BestN sorts ascending (reverse=False) and keeps the last n: the highest SRCC. best_fn must be set too, or
  # orbax neither writes the metrics nor tracks best_step() (which then returns the latest step).
  policy = pp.AnyPreservationPolicy([
      pp.LatestN(n=keep),
      pp.BestN(get_metric_fn=best_metric, reverse=False, n=1, keep_checkpoints_without_metrics=False),
  ])
  return ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=best_metric, best_mode="max",
                                      read_only=read_only, create=not read_only,
                                      cleanup_tmp_directories=not read_only,
                                      save_interval_steps=0 if read_only else 1)  # a reader saves nothing


def checkpoint_step(ckpts: Any, which: str | int) -> int:
  """The step of checkpoint `which`: "best" (by validation SRCC; the latest when none has a metric), "latest",
  or a step number. `ckpts`: anything with best_step(), latest_step(), all_steps() and directory.

  Raises:
    FileNotFoundError: there is no such checkpoint (the message lists the steps found).
  """
  if which == "best":
    step = ckpts.best_step() if ckpts.best_step() is not None else ckpts.latest_step()
  elif which == "latest":
    step = ckpts.latest_step()
  else:
    try:
      step = int(which)
    except (TypeError, ValueError):
      raise ValueError(f"checkpoint={which!r}: expected 'best', 'latest' or a step number") from None
  if step is None or step not in ckpts.all_steps():
    raise FileNotFoundError(f"{ckpts.directory}: no checkpoint {which!r} (found steps {ckpts.all_steps()}); "
                            "train first with the same --workdir")
  return step


# ---------------------------------------------------------------------------------------------------------------
# Damaged checkpoint steps: a step whose files fail to read (truncated, garbled, missing) is named in one line.

DAMAGED_SUFFIX = ".damaged"  # <checkpoint_dir>.damaged/<step>: where training moves a damaged step (kept, not deleted)
# A restore that fails because the model asks for other shapes than the stored ones: the config differs, the
# files are fine (reported as a config mismatch, never as damage).
SHAPE_MISMATCH = "Requested shape"


class DamagedCheckpointError(ValueError):
  """A checkpoint step that fails to read: `step`, `file` (the damaged file, or the item being read) and `error`."""

  def __init__(self, step_dir: str | os.PathLike[str], error: BaseException, reading: str | os.PathLike[str]):
    step_dir = rundir.path(step_dir)
    self.step = int(step_dir.name)
    self.step_dir = step_dir
    self.file = _named_file(step_dir, error, reading)
    self.error = one_line(error)
    super().__init__(f"checkpoint step {self.step} is damaged: {self.file}: {self.error}")


def one_line(error: BaseException) -> str:
  """The error's type and message on one line, without TensorStore's spec dump or a decoder's byte dump."""
  if isinstance(error, UnicodeDecodeError):
    msg = f"not UTF-8 text ({error.reason} at byte {error.start})"
  else:
    msg = str(error).split(" [tensorstore_spec=", 1)[0]
  msg = " ".join(msg.split())
  if len(msg) > 400:  # the start says what failed, the end why (an OS error such as "No space left on device")
    msg = f"{msg[:220]} ... {msg[-170:]}"
  return f"{type(error).__name__}: {msg}"


def _named_file(step_dir: epath.Path, error: BaseException, reading: str | os.PathLike[str]) -> str:
  """The file of `step_dir` an error names (the deepest one), else `reading` (what was being read)."""
  if getattr(error, "filename", None):
    return str(error.filename)
  root = str(step_dir)
  found = [m.rstrip(".,:;") for m in re.findall(r"[^\s\"']+", str(error)) if root in m]
  found = [f[f.index(root):] for f in found]
  return max(found, key=len) if found else str(reading)


def damage(step_dir: str | os.PathLike[str], error: BaseException, reading: str | os.PathLike[str]
           ) -> DamagedCheckpointError | None:
  """`error` (raised while reading `reading` of checkpoint `step_dir`) as a DamagedCheckpointError; None when it
  is not damage: a shape mismatch (another config) or an interruption."""
  if not isinstance(error, Exception) or SHAPE_MISMATCH in str(error):
    return None
  if isinstance(error, DamagedCheckpointError):
    return error
  return DamagedCheckpointError(step_dir, error, reading)


def check_step(step_dir: str | os.PathLike[str]) -> None:
  """Reads checkpoint `step_dir`'s meta and trainable parameters (on this process's first device), as inference
  does; raises DamagedCheckpointError when they fail to read."""
  step_dir = rundir.path(step_dir)
  for reading, read in ((step_dir / META / "metadata", read_meta), (step_dir / PARAMS, read_params)):
    try:
      read(step_dir)
    except Exception as e:  # pylint: disable=broad-except
      d = damage(step_dir, e, reading)
      if d is None:
        raise
      raise d from e


def step_metric(step_dir: str | os.PathLike[str]) -> float | None:
  """The validation SRCC orbax ranks step `step_dir` by (its `metrics` item), or None (none, or unreadable)."""
  try:
    value = rundir.read_json(rundir.path(step_dir) / "metrics" / "metrics")
    return best_metric(value) if value and BEST_METRIC in value else None
  except (ValueError, OSError):
    return None


def readable_step(ckpts: Any, which: str | int, check=check_step) -> int:
  """`checkpoint_step(ckpts, which)`, checked to read (`check(step_dir)`). "best" falls back, one warning line per
  damaged step, to the next best step that reads (by validation SRCC, then the latest ones), as a resumed run falls
  back to the previous good step. "latest" or a step number that fails to read is an error naming the file and the
  steps that do read.

  Raises:
    DamagedCheckpointError: the step asked for (or, for "best", every step) fails to read.
  """
  step = checkpoint_step(ckpts, which)
  if which != "best":
    try:
      check(ckpts.directory / str(step))
    except Exception as e:  # pylint: disable=broad-except
      d = damage(ckpts.directory / str(step), e, ckpts.directory / str(step))
      if d is None:
        raise
      good = [s for s in sorted(ckpts.all_steps()) if s != step and _reads(ckpts.directory / str(s), check)]
      raise _suggest(d, good) from e
    return step
  metric = {s: step_metric(ckpts.directory / str(s)) for s in ckpts.all_steps()}
  order = [step] + sorted((s for s in ckpts.all_steps() if s != step),
                          key=lambda s: (metric[s] is not None, metric[s] or 0.0, s), reverse=True)
  for s in order:
    try:
      check(ckpts.directory / str(s))
      return s
    except Exception as e:  # pylint: disable=broad-except
      d = damage(ckpts.directory / str(s), e, ckpts.directory / str(s))
      if d is None:
        raise
      log.warning("%s; trying the next best step", d)
  raise DamagedCheckpointError(ckpts.directory / str(step), RuntimeError(
      f"every checkpoint step of {ckpts.directory} fails to read ({order})"), ckpts.directory)


def _reads(step_dir: epath.Path, check) -> bool:
  try:
    check(step_dir)
  except Exception as e:  # pylint: disable=broad-except
    if damage(step_dir, e, step_dir) is None:
      raise
    return False
  return True


def _suggest(d: DamagedCheckpointError, good: list[int]) -> DamagedCheckpointError:
  d.args = (f"{d}; the steps that read: {good or 'none'}"
            + (f" (e.g. --checkpoint {good[-1]})" if good else ""),)
  return d


class _DropReadOnlyNotice(logging.Filter):
  # orbax logs "Given directory is read only" at WARNING for every read-only manager: it is what was asked for.
  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Given directory is read only")


@contextlib.contextmanager
def quiet_read_only() -> Iterator[None]:
  """Around opening a read-only CheckpointManager: without orbax's notice that it is read-only."""
  notice = _DropReadOnlyNotice()
  logger = logging.getLogger("absl")  # orbax logs through absl.logging, i.e. the "absl" Python logger
  logger.addFilter(notice)
  try:
    yield
  finally:
    logger.removeFilter(notice)


class ReadOnlyCheckpoints:
  """The checkpoints of a run, read-only: which steps there are, the best one, and one step's items."""

  def __init__(self, directory: str | os.PathLike[str]):
    self.directory = rundir.absolute(directory)
    with quiet_read_only():
      self.manager = ocp.CheckpointManager(self.directory, options=manager_options(read_only=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return self.manager.best_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def close(self) -> None:
    self.manager.close()

  def __enter__(self) -> ReadOnlyCheckpoints:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def checkpoint_dir(workdir: str | os.PathLike[str]) -> epath.Path:
  """Where the checkpoints of the run in `workdir` are: the checkpoint_dir of its run.json's config when set, else
  <workdir>/checkpoints."""
  run = read_run(workdir)
  return rundir.checkpoint_dir(workdir, run["config"].get("checkpoint_dir") if run else None)


def locate(path: str | os.PathLike[str], checkpoint: str | int) -> tuple[epath.Path, str | int]:
  """(workdir, checkpoint) from a workdir (local or gs://), its checkpoints/ folder or a step folder inside it."""
  path = rundir.path(path)
  if (path / rundir.CHECKPOINTS).is_dir() or ((path / RUN_FILE).exists() and checkpoint_dir(path).is_dir()):
    return path, checkpoint
  if path.name == rundir.CHECKPOINTS and path.is_dir():
    return path.parent, checkpoint
  if path.name.isdigit() and path.parent.name == rundir.CHECKPOINTS and path.is_dir():
    return path.parent.parent, int(path.name)
  raise FileNotFoundError(f"{path}: not a training run (expected a workdir with checkpoints/, its checkpoints/ "
                          "folder, or a checkpoints/<step> folder)")


# Config fields renamed or dropped since runs were first written. Every saved config is read through
# `upgrade_config`, so runs written before a rename still resume, evaluate, score and export.
RENAMED_FIELDS = {"splits": "num_splits", "data.split": "data.split_protocol",
                  "model.image_chunk": "clip.image_chunk"}  # a compute option of the tower, not of the model
RETIRED_FIELDS = ("train.eval_every",)  # never read by any version
# Names that were built in before `plugins` (the modules registering generated backbones and datasets) existed, and
# the module that registers them now: a saved config without `plugins` that uses one gets that module.
BUILT_IN_BEFORE_PLUGINS = {("clip.name", "tiny"): "mcpf_jax.smoke", ("data.name", "smoke"): "mcpf_jax.smoke"}


def upgrade_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """A saved config (JSON data) with the fields of RENAMED_FIELDS under their current names, RETIRED_FIELDS gone,
  and for one from before `plugins` the plugins of the names it uses (BUILT_IN_BEFORE_PLUGINS)."""
  out = json.loads(json.dumps(config))

  def parent(dotted: str) -> tuple[dict[str, Any] | None, str]:
    *path, leaf = dotted.split(".")
    node = out
    for k in path:
      node = node.get(k) if isinstance(node, dict) else None
    return (node if isinstance(node, dict) else None), leaf

  for old, new in RENAMED_FIELDS.items():
    node, leaf = parent(old)
    if node is not None and leaf in node:
      value = node.pop(leaf)
      new_node, new_leaf = parent(new)
      if new_node is not None:
        new_node.setdefault(new_leaf, value)
  for gone in RETIRED_FIELDS:
    node, leaf = parent(gone)
    if node is not None:
      node.pop(leaf, None)
  if "plugins" not in out:
    plugins = []
    for (field, value), module in BUILT_IN_BEFORE_PLUGINS.items():
      node, leaf = parent(field)
      if node is not None and node.get(leaf) == value and module not in plugins:
        plugins.append(module)
    if plugins:
      out["plugins"] = plugins
  return out


def read_run(workdir: str | os.PathLike[str]) -> dict[str, Any] | None:
  """<workdir>/run.json (the run's resolved config, dataset identity, split protocol, backbone), or None."""
  path = rundir.path(workdir) / RUN_FILE
  run = rundir.read_json(path)
  if run is None:
    return None
  if "config" not in run:
    raise ValueError(f"{path}: has no 'config' field")
  run["config"] = upgrade_config(run["config"])
  return run


def config_from_meta(meta: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The training config saved in a checkpoint's `meta` item (JSON: tuples come back as lists)."""
  if "config" not in meta:
    raise ValueError("the checkpoint's meta item has no 'config' (written by an older version?)")
  return ml_collections.ConfigDict(upgrade_config(meta["config"]))


@dataclasses.dataclass(frozen=True)
class GeneratedBackbone:
  """A backbone written by code on first use instead of downloaded, registered under a clip.name by a plugin (a
  module of config.plugins).

  recipe(config) -> the JSON-able fields its weights are a function of; write(folder, **recipe) writes it as a
  Hugging Face folder (idempotent: a folder holding this recipe is left as it is); clip_config(recipe) -> its
  CLIPConfig without writing anything (the pre-flight compiles without weights).
  """
  recipe: Callable[[Any], dict[str, Any]]
  write: Callable[..., Any]
  clip_config: Callable[[dict[str, Any]], clip.CLIPConfig]


BACKBONES: dict[str, GeneratedBackbone] = {}


def register_backbone(name: str, backbone: GeneratedBackbone) -> None:
  """Makes clip.name=`name` the generated backbone `backbone` (`load_clip` writes it into the run folder)."""
  BACKBONES[name] = backbone


def load_clip(config, workdir: str | os.PathLike[str], *, name: str | None = None) -> clip.Bundle:
  """The run's CLIP: config.clip.name (or `name`): a hub id, folder, preset or registered generated backbone.

  A generated backbone (BACKBONES) is written into <workdir>/<name>_clip, or for a run kept in a bucket into a local
  folder (`rundir.generated_backbone_dir`); the same recipe gives the same weights, so a resumed run or a scorer
  finds the backbone it was trained on.
  """
  name = name or config.clip.name
  generated = BACKBONES.get(name)
  if generated is not None:
    name = str(_generated_backbone(name, generated, config, workdir))
  try:
    bundle = clip.load(name, dtype=config.clip.dtype, revision=config.clip.revision, remat=config.clip.remat,
                       param_dtype=config.clip.get("param_dtype", "float32"))
  except FileNotFoundError as e:
    if generated is not None or pathlib.Path(name).expanduser().exists():
      raise
    raise FileNotFoundError(f"{e}; nor is {name!r} a generated backbone (registered: {sorted(BACKBONES)}; "
                            f"config.plugins={list(config.get('plugins', ()))} lists the modules that register "
                            "them)") from e
  return bundle.with_compute(**compute_options(config, bundle.config, name))


def compute_options(config, clip_config: Any, name: str) -> dict[str, Any]:
  """The compute options of config.clip that a backbone's config (`clip_config`, of `name`) takes: scan_layers, and
  image_chunk where its tower chunks the batch (a CLIP). On another tower a set image_chunk is named in a warning,
  not refused: a run saved with model.image_chunk (the field's old place, ignored on SigLIP) must still load."""
  options = {"scan_layers": bool(config.clip.get("scan_layers", False))}
  chunk = config.clip.get("image_chunk")
  if chunk is not None and not hasattr(clip_config, "image_chunk"):
    log.warning("clip.image_chunk=%s has no effect on %s (a %s encodes the whole batch in one pass)", chunk, name,
                type(clip_config).__name__)
  elif chunk is not None:
    options["image_chunk"] = int(chunk)
  return options


def _sync(name: str) -> None:
  """A barrier across processes (multi-host), a no-op in one process. `name` holds no path: it must be the same
  string on every host, wherever each mounts the run folder."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _generated_backbone(name: str, backbone: GeneratedBackbone, config,
                        workdir: str | os.PathLike[str]) -> pathlib.Path:
  """The generated backbone's folder, written once and whole. In a local run folder (one every process sees)
  process 0 writes it and the others wait; a run in a bucket keeps it in each host's local cache, which each
  process fills (a temporary folder renamed into place: a process that finds it there already leaves it)."""
  recipe = backbone.recipe(config)
  folder = rundir.generated_backbone_dir(workdir, name, recipe)
  shared = not rundir.is_remote(workdir)
  if not shared or jax.process_index() == 0:
    if folder.exists():
      backbone.write(folder, **recipe)  # idempotent: returns at once when the folder holds this recipe
    else:
      folder.parent.mkdir(parents=True, exist_ok=True)
      tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
      shutil.rmtree(tmp, ignore_errors=True)
      backbone.write(tmp, **recipe)
      try:
        os.rename(tmp, folder)
      except OSError:  # another process on this disk put its (identical) copy there first
        shutil.rmtree(tmp, ignore_errors=True)
        backbone.write(folder, **recipe)
  if shared:
    _sync(f"backbone {name} written")
  return folder


def check_backbone(meta: Mapping[str, Any], source: str, fingerprint: str, where: os.PathLike[str]) -> None:
  """The backbone a checkpoint was trained on must be the one loaded now (same parameter values)."""
  saved = meta.get("backbone", {})
  if saved.get("fingerprint") != fingerprint:
    raise ValueError(f"{where}: the checkpoint was trained on the CLIP backbone {saved.get('source')!r} "
                     f"(fingerprint {saved.get('fingerprint')}), but the configured backbone {source!r} has "
                     f"fingerprint {fingerprint}; point clip.name at the original weights")


# ---------------------------------------------------------------------------------------------------------------
# One checkpoint step, read without its manager.


def layout(step_dir: str | os.PathLike[str]) -> int:
  """2 for this layout, 1 for layout 1 (one `state` item); anything else is refused, naming what was found."""
  step_dir = rundir.path(step_dir)
  if (step_dir / PARAMS).is_dir():
    return LAYOUT
  if (step_dir / OLD_STATE).is_dir():
    return 1
  found = sorted(p.name for p in step_dir.iterdir()) if step_dir.is_dir() else "nothing (no such folder)"
  raise ValueError(f"{step_dir}: not a checkpoint of this project: expected an orbax item {PARAMS!r} (or "
                   f"{OLD_STATE!r}, layout 1, before params/opt/meta were saved apart), found {found}")


def read_meta(step_dir: str | os.PathLike[str]) -> dict[str, Any]:
  step_dir = rundir.path(step_dir)
  if not (step_dir / META).is_dir():
    raise FileNotFoundError(f"{step_dir}: no {META!r} item (not a checkpoint written by mcpf_jax)")
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ck:
    return ck.restore(step_dir / META)


def _abstract(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """orbax array metadata -> ShapeDtypeStructs on `sharding` (empty subtrees stay None)."""
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding), tree)


def read_params(step_dir: str | os.PathLike[str], sharding: jax.sharding.Sharding | None = None
                ) -> dict[str, jax.Array]:
  """The trainable parameters of one checkpoint step, {"path/to/leaf": array}; no optimizer involved.

  The arrays are placed on `sharding` (default: this process's first device). Both layouts are read.
  """
  step_dir = rundir.path(step_dir)
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  item = PARAMS if layout(step_dir) == LAYOUT else OLD_STATE
  # The item is read with its own handler, as CheckpointManager reads an item of a step: a Checkpointer would look
  # for a step's metadata file in the item's folder (the manager writes it one level up) and warn it is missing.
  handler = ocp.StandardCheckpointHandler()
  try:
    tree = handler.metadata(step_dir / item).tree
    if item == OLD_STATE and "params" not in tree:
      raise ValueError(f"{step_dir / item}: a layout-1 'state' item without 'params' (found {sorted(tree)})")
    restored = handler.restore(step_dir / item, args=ocp.args.StandardRestore(_abstract(tree, sharding)))
  finally:
    handler.close()
  params = restored if item == PARAMS else restored["params"]
  return traverse_util.flatten_dict(params, sep="/")
