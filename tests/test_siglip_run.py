"""A training run on a SigLIP backbone, in process: a tiny random SigLIP written by transformers in the real format
(with a SigLIP 2-format tokenizer.json built here; the real files cannot be downloaded on the machines these tests run
on) trains MCPF on the smoke data, resumes exactly from a checkpoint along the way, evaluates, records the backbone
family in the run's identity, exports with the backbone included and scores through `Scorer.from_pretrained`."""

from __future__ import annotations

import json
import shutil

import jax
import ml_collections
import numpy as np
from conftest import smoke_run_config
from siglip_support import write_tiny_siglip

from mcpf_jax import runs
from mcpf_jax.export import export
from mcpf_jax.scoring import Scorer
from mcpf_jax.train import evaluation, trainer


def _final_params(workdir):
  with runs.ReadOnlyCheckpoints(runs.checkpoint_dir(workdir)) as ckpts:
    step = ckpts.latest_step()
  return step, jax.device_get(runs.read_params(runs.checkpoint_dir(workdir) / str(step)))


def test_siglip_backbone_trains_resumes_evaluates_exports_and_scores(tmp_path):
  backbone = tmp_path / "tiny_siglip"
  write_tiny_siglip(backbone, seed=2)
  config = smoke_run_config()
  config.clip.name = str(backbone)
  config.data.data_dir = str(tmp_path / "data")
  config.eval.num_crops = 2
  workdir = tmp_path / "run"
  summary = trainer.train_and_evaluate(config, workdir)
  record = json.loads((workdir / "run.json").read_text())
  assert record["backbone"]["family"] == "siglip", record["backbone"]
  step, params = _final_params(workdir)
  # Resume: a copy of the run cut back to its first checkpoint trains on to the same weights.
  resumed = tmp_path / "resumed"
  shutil.copytree(workdir, resumed)
  with runs.ReadOnlyCheckpoints(runs.checkpoint_dir(resumed)) as ckpts:
    steps = ckpts.all_steps()
  assert len(steps) >= 2 and steps[-1] == step, steps
  for later in steps[1:]:
    shutil.rmtree(runs.checkpoint_dir(resumed) / str(later))
  trainer.train_and_evaluate(config, resumed)
  step_again, params_again = _final_params(resumed)
  assert step_again == step
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_again)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
  evaluated = evaluation.evaluate(None, workdir)
  assert np.isfinite(json.loads((workdir / "eval.json").read_text())["srcc"]), evaluated
  # Export with the backbone (weights, config, tokenizer files) and score offline from the folder.
  out = export(workdir, tmp_path / "exported", checkpoint="latest", include_backbone=True)
  scorer = Scorer.from_pretrained(out["output"], num_workers=0, num_crops=2)
  image = np.random.default_rng(0).integers(0, 256, size=(256, 300, 3), dtype=np.uint8)  # the smoke resize: 256
  results = scorer.score([image])
  assert len(results) == 1 and results[0].error is None and np.isfinite(results[0].score), results
  assert summary is not None


def test_image_chunk_on_a_siglip_backbone_is_named_as_having_no_effect(tmp_path, caplog):
  """clip.image_chunk chunks a CLIP vision tower's batch; a SigLIP tower has no chunked path. A run saved with the
  field's old name (model.image_chunk, which SigLIP ignored) still loads: a warning names it, nothing is refused."""
  backbone = tmp_path / "tiny_siglip"
  write_tiny_siglip(backbone, seed=2)
  config = smoke_run_config()
  config.clip.name = str(backbone)
  unset = runs.load_clip(config, tmp_path)
  assert "image_chunk" not in caplog.text
  saved = runs.upgrade_config(json.loads(config.to_json_best_effort()))
  del saved["clip"]["image_chunk"]
  saved["model"]["image_chunk"] = 4  # as a run saved before the rename
  old = ml_collections.ConfigDict(runs.upgrade_config(saved))
  assert old.clip.image_chunk == 4
  loaded = runs.load_clip(old, tmp_path)
  assert f"clip.image_chunk=4 has no effect on {backbone}" in caplog.text and "SiglipConfig" in caplog.text
  assert loaded.config == unset.config and loaded.fingerprint == unset.fingerprint
