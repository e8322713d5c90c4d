"""What a config means on this job, derived in one place: its plugins imported, the mesh's shape, the batch sizes
fitted to it, the model's input size, the optimizer's schedule length and a saved run's config. Training, evaluation,
the pre-flight (aot), scoring and export take these from here instead of deriving them again."""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections

from mcpf_jax import config_schema, runs

log = logging.getLogger("mcpf_jax")


_MODULE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def load_plugins(config) -> None:
  """Imports the modules of config.plugins, which register generated backbones (`runs.register_backbone`) and
  datasets (`mcpf_jax.data.register_generated`) under the names clip.name and data.name use; e.g. "mcpf_jax.smoke"
  (configs/smoke.py). Importing one twice does nothing."""
  for module in config.get("plugins", ()):
    if not isinstance(module, str) or not _MODULE.match(module):
      raise ValueError(f"plugins: {module!r} is not a module name (expected a dotted name such as 'mcpf_jax.smoke')")
    try:
      importlib.import_module(module)
    except ModuleNotFoundError as e:
      raise ValueError(f"plugins: cannot import {module!r} ({e}); config.plugins lists the modules that register "
                       "generated backbones and datasets") from e


def mesh_shape(data: int, model: int, num_devices: int) -> tuple[int, int]:
  """(data, model) of the mesh over `num_devices` devices; one of the two may be -1 = the rest."""
  if data == -1 and model == -1:
    raise ValueError("mesh: at most one of mesh.data and mesh.model may be -1")
  if data == -1:
    data = num_devices // model
  if model == -1:
    model = num_devices // data
  if data * model != num_devices or data < 1 or model < 1:
    raise ValueError(f"mesh: data={data} x model={model} does not use the {num_devices} devices available")
  return data, model


def fit_batch(field: str, batch_size: int, data: int, accumulate_steps: int = 1) -> int:
  """The batch size used for config field `field`: `batch_size` rounded up to a multiple of `data` (the mesh's
  data axis) x `accumulate_steps`, so that a pod needs no per-topology batch. A changed value is logged (one line).

  Unchanged wherever it divides already (the results of such runs stay what they were). Raises ValueError for a
  batch below 1 or one that the accumulation steps do not divide (a config error on any mesh).
  """
  if batch_size < 1:
    raise ValueError(f"{field}={batch_size} must be at least 1")
  if batch_size % accumulate_steps:
    raise ValueError(f"{field}={batch_size} must be divisible by train.accumulate_steps ({accumulate_steps})")
  multiple = data * accumulate_steps
  fitted = -(-batch_size // multiple) * multiple
  if fitted != batch_size:
    why = f"the mesh's data axis ({data} devices)" + (f" x train.accumulate_steps ({accumulate_steps})"
                                                      if accumulate_steps > 1 else "")
    log.info("%s=%d -> %d: rounded up to a multiple of %s", field, batch_size, fitted, why)
  return fitted


def resolve(config, num_devices: int | None = None, *, training: bool = True) -> ml_collections.ConfigDict:
  """The config a job runs with on `num_devices` devices (default: this job's): a copy whose eval.batch_size and,
  when `training`, train.batch_size are fitted to the mesh's data axis (`fit_batch`). A run's config (run.json)
  holds the batch it trains with, so a restart on a mesh that would round it differently is refused like any other
  change; an evaluation keeps the run's train.batch_size as it is. Imports config.plugins (`load_plugins`).

  A config to train with is checked against the schema (`config_schema.validate`: every missing, unknown or
  mistyped field named before anything runs; its plugins' fields once they are imported); an evaluation's is a
  saved run's, which may predate fields."""
  load_plugins(config)
  if training:
    config_schema.validate(config)
  data, _ = mesh_shape(config.mesh.data, config.mesh.model,
                       jax.device_count() if num_devices is None else num_devices)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    if training:
      config.train.batch_size = fit_batch("train.batch_size", int(config.train.batch_size), data,
                                          int(config.train.accumulate_steps))
    config.eval.batch_size = fit_batch("eval.batch_size", int(config.eval.batch_size), data)
  return config


def image_size(config, clip_config) -> int:
  """The model's input size: `data.image_size`, or where that is 0/None the backbone's own (`vision.image_size`)."""
  return int(config.data.image_size or clip_config.vision.image_size)


def optim_config(config, steps_per_epoch: int) -> ml_collections.ConfigDict:
  """config.optim with total_steps resolved (num_epochs x steps_per_epoch when it is None)."""
  oc = config.optim.copy_and_resolve_references()
  with oc.unlocked():
    if oc.total_steps is None:
      oc.total_steps = config.train.num_epochs * steps_per_epoch
  return oc


def saved_config(run: Mapping[str, Any] | None,
                 meta: Mapping[str, Any] | Callable[[], Mapping[str, Any]]) -> ml_collections.ConfigDict:
  """The config a run was trained with: its run.json's (`run`, as `runs.read_run` gives it), else, for runs of
  older versions without run.json, the one saved in a checkpoint's `meta` (or a function that reads it). Its plugins
  are imported (`load_plugins`)."""
  if run is not None:
    config = ml_collections.ConfigDict(runs.upgrade_config(run["config"]))
  else:
    config = runs.config_from_meta(meta() if callable(meta) else meta)
  load_plugins(config)
  return config
