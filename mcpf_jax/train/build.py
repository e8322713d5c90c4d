"""A run as it is built from its config: the mesh, the CLIP backbone, the IQA model and its parameters, which
of them train, and the dataset with its split. Training, evaluation and the benchmarks start from `build_run`."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath

from mcpf_jax import clip, resolve, rundir, runs
from mcpf_jax import model as iqa
from mcpf_jax.model import freeze
from mcpf_jax.train import data_setup, optim
from mcpf_jax.train import mesh as mesh_lib


@dataclasses.dataclass
class Run:
  """Everything a run builds from its config (shared by training, evaluation and scoring)."""
  config: Any
  workdir: epath.Path  # a local folder or gs://bucket/path (mcpf_jax.rundir)
  mesh: Any
  bundle: clip.Bundle
  model: iqa.IQAModel
  params: Any
  mask: Any  # freeze.mask of params: which leaves train
  data: data_setup.RunData

  @property
  def image_size(self) -> int:
    return resolve.image_size(self.config, self.bundle.config)

  def meta(self) -> dict[str, Any]:
    return {
        "backbone": {"source": self.bundle.source, "fingerprint": self.bundle.fingerprint,
                     "family": getattr(self.bundle.config, "family", "clip")},
        "dataset": self.data.name,
        "label_transform": dataclasses.asdict(self.data.score_map),
        "split": {k: len(v) for k, v in self.data.indices.items()},
        "config": json.loads(self.config.to_json_best_effort()),
    }


def build_run(config, workdir: str | os.PathLike[str], *, dataset: str | None = None) -> Run:
  """The run of `config` in `workdir` (created); `dataset`: another dataset to read (cross-dataset evaluation)."""
  workdir = rundir.path(workdir)
  if not rundir.is_remote(workdir):  # a bucket has no folders to create: an object's name makes its "folder"
    workdir.mkdir(parents=True, exist_ok=True)
  mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.model)
  bundle = runs.load_clip(config, workdir)
  data = data_setup.load(config, workdir, dataset=dataset)
  model, params = iqa.build(config.model, bundle, jax.random.key(config.seed))
  mask = freeze.mask(params, config.model.trainable)
  trainable, _ = optim.partition(params, mask)
  low = sorted(k for k, v in trainable.items() if v.dtype != jnp.float32)
  if low:
    raise ValueError(f"clip.param_dtype={config.clip.param_dtype!r} stores trainable parameters in low precision "
                     f"({low[0]}, ... {len(low)} leaves): model.trainable={config.model.trainable!r} trains the "
                     "backbone, whose weights must then stay float32 (clip.param_dtype=float32)")
  return Run(config, workdir, mesh, bundle, model, params, mask, data)

