"""The ahead-of-time pre-flight (mcpf_jax.aot): real libtpu compiles for TPU topologies this machine does not have.

The compiles run `python -m mcpf_jax.aot` in a subprocess (the command users run; JAX_PLATFORMS=cpu there too, so
libtpu is only ever the compiler, never a runtime backend of the tests), with ALLOW_MULTIPLE_LIBTPU_LOAD=1 (libtpu
takes a process lock that two pytest-xdist workers would otherwise fight over) and TPU_LOG_DIR in tmp_path.
They are skipped, with the reason, where libtpu is not installed (requirements-test.txt installs it).
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.extend
import jax.numpy as jnp
import pytest

from mcpf_jax import aot
from mcpf_jax.clip import config as clip_config
from mcpf_jax.clip import model as clip_model
from mcpf_jax.clip.tiny import tiny_config
from mcpf_jax.model import flops

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu not installed (pip install 'jax[tpu]')")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _aot(tmp_path, *args: str) -> tuple[int, dict | None, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env.update(JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1", TPU_LOG_DIR=str(tmp_path / "tpu_logs"))
  proc = subprocess.run([sys.executable, "-m", "mcpf_jax.aot", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  lines = proc.stdout.strip().splitlines()
  report = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
  return proc.returncode, report, proc.stdout + proc.stderr


def _check_flops(r: dict, tolerance: float) -> None:
  """XLA's count of what the devices run vs the analytic count of the same work (text tower on every device)."""
  assert r["flops_per_step"] == pytest.approx(r["flops_per_device"] * r["devices"])
  assert r["flops_per_step"] == pytest.approx(r["analytic_flops_executed"], rel=tolerance), r
  assert r["model_flops_per_step"] < r["analytic_flops_executed"]  # the useful work counts the text tower once


@needs_libtpu
def test_smoke_config_compiles_for_a_v5e_slice(tmp_path):
  # A wider tiny CLIP than the smoke run's (width 64), so matmuls dominate the FLOPs as in a real CLIP; only
  # shapes are used, no weights are read.
  rc, r, log = _aot(tmp_path, "--config", "configs/smoke.py", "--topology", "v5e:2x4", "--config.clip.tiny.width=256",
                    "--config.model.fusion_width=64")
  assert rc == 0, log
  for key in aot.report_keys():
    assert key in r, key
  assert (r["topology"], r["platform"], r["device_kind"]) == ("v5e:2x4", "tpu", "TPU v5 lite")
  assert (r["devices"], r["hosts"], r["mesh"]) == (8, 2, {"data": 8, "model": 1})
  assert r["fits"] is True and r["global_batch"] == 32
  # The TPU program takes the TPU paths (fused attention, no image-chunk loop), though this process is on CPU.
  assert r["attention"] == "fused" and r["vision_chunk"] == 32
  assert 0 < r["peak_bytes_per_device"] < r["device_memory_bytes"] == 16 * 2 ** 30
  assert r["train"]["temp_size_in_bytes"] > 0 and r["eval"]["peak_bytes"] > 0
  _check_flops(r, 0.05)
  # Data parallelism: the prompt gradients (and metrics) are all-reduced, nothing is all-gathered.
  assert r["collectives"]["all-reduce"]["count"] >= 1 and "all-gather" not in r["collectives"]
  assert r["compile_s"] > 0 and r["step_s_at_mfu"] > 0


@needs_libtpu
def test_multi_slice_multi_host_topology(tmp_path):
  rc, r, log = _aot(tmp_path, "--config", "configs/smoke.py", "--topology", "v5e:4x4", "--num_slices=2",
                    "--steps=train", "--config.train.batch_size=64")
  assert rc == 0, log
  assert (r["devices"], r["hosts"], r["slices"], r["mesh"]) == (32, 8, 2, {"data": 32, "model": 1})
  assert r["fits"] is True and r["eval"].get("skipped") is True
  _check_flops(r, 0.10)  # width 64: LayerNorms, softmax and the optimizer are ~6% of the step
  assert r["collectives"]["all-reduce"]["count"] >= 1


@needs_libtpu
def test_oversized_config_is_reported_as_not_fitting(tmp_path):
  rc, r, log = _aot(tmp_path, "--config", "configs/smoke.py", "--topology", "v5e:2x2", "--steps=train",
                    "--config.train.batch_size=262144")
  assert rc == 2, log
  assert "Traceback" not in log
  assert r["fits"] is False and r["train"]["fits"] is False
  assert "memory" in r["train"]["error"].lower()
  assert r["peak_bytes_per_device"] > r["device_memory_bytes"]
  assert "DOES NOT FIT" in log


@needs_libtpu
def test_bad_topology_names_the_flag(tmp_path):
  rc, r, log = _aot(tmp_path, "--config", "configs/smoke.py", "--topology", "v9:2x2")
  assert rc == 1 and r is None
  assert "--topology='v9:2x2'" in log and "v5e:2x4" in log


def test_bad_mesh_and_batch_name_the_flag():
  config = _smoke_config()
  target = aot.Target("one-cpu", "cpu", jax.devices()[:1])
  with config.unlocked():
    config.mesh.data = 3
  with pytest.raises(aot.PreflightError, match=r"--config.mesh.data=3 .* does not use the 1 devices"):
    aot.preflight(config, target)
  with config.unlocked():
    config.mesh.data = -1
    config.train.accumulate_steps = 5
  with pytest.raises(aot.PreflightError,
                     match=r"--config.train.batch_size=32 must be divisible .*accumulate_steps \(5\)"):
    aot.preflight(config, target)


def _smoke_config():
  return _config("smoke")


def _config(name: str):
  spec = importlib.util.spec_from_file_location(f"{name}_config", os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, REPO)
  try:
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(REPO)
  return module.get_config()


def _primitives(platform: str, batch: int = 16) -> list[str]:
  cc = tiny_config(width=256, layers=1, heads=4, image_size=32, patch_size=16).replace(platform=platform)
  model = clip_model.CLIP(cc)
  pixels = jnp.zeros((batch, 32, 32, 3))
  params = jax.eval_shape(model.init, jax.random.key(0), pixels[:1], jnp.zeros((1, 77), jnp.int32))
  jaxpr = jax.make_jaxpr(lambda p, x: model.apply(p, x, method=clip_model.CLIP.encode_image))(params, pixels)
  out = []

  def walk(j):
    for e in j.eqns:
      out.append(e.primitive.name)
      for sub in jax.extend.core.jaxprs_in_params(e.params):
        walk(sub)

  walk(jaxpr.jaxpr)
  return out


def test_the_target_platform_picks_the_code_path_not_the_host():
  """CLIPConfig.platform decides: a TPU target gets fused attention and no chunk loop in this CPU process."""
  assert jax.default_backend() == "cpu"
  tpu, cpu = _primitives("tpu"), _primitives("cpu")
  assert "scan" not in tpu and "scan" in cpu  # 16 images: one pass on TPU, two chunks of 8 on CPU
  # Per-head attention: 2 matmuls per head; fused: 2 batched over the heads (plus the 4 projections, the MLP's 2).
  assert tpu.count("dot_general") < cpu.count("dot_general")
  assert clip_config.CLIPConfig(platform=None).target_platform() == "cpu"
  with pytest.raises(ValueError, match="platform 'xpu'"):
    clip_config.CLIPConfig(platform="xpu")


def test_analytic_flops_match_the_recorded_vit_b16_count():
  """model.flops reproduces the analytic count benchmarks/train_step.py recorded (2290.92 GFLOP, B/16, batch 32)."""
  config = _smoke_config()
  with config.unlocked():
    config.clip.name = "openai/clip-vit-base-patch16"  # the hub id maps to its preset: nothing is downloaded
    for k in ("prompt_depth", "num_text_prompts", "num_vision_prompts", "fusion_width", "fusion_heads"):
      config.model[k] = {"prompt_depth": 9, "num_text_prompts": 8, "num_vision_prompts": 8, "fusion_width": 128,
                         "fusion_heads": 4}[k]
  model, *_ = aot.build(config, "tpu")
  rows = sum(len(r) for _, r in model.text_ids)
  out = flops.step_flops(model.clip_config, model.spec, 32, rows, model.text_span, train=True)
  assert rows == 25 and out["total"] / 1e9 == pytest.approx(2290.92, abs=0.01)
  full = flops.step_flops(model.clip_config, model.spec, 32, rows, model.text_span, train=True, backbone_trains=True)
  assert 1.4 < full["total"] / out["total"] < 1.5  # + the weight gradients (none for the pixels)


def test_colab_notebook_default_is_the_preflighted_config():
  """The notebook's default (CONFIG, OVERRIDES) is what benchmarks/aot_table.py compiled for Colab's v5e-1 runtime.

  The compile itself (about 3 minutes for ViT-B/16 on 2 cores) is too slow for the suite; this fails when the
  notebook's default changes, so the pre-flight is re-run (`python benchmarks/aot_table.py --only v5e-1 --redo`).
  """
  import ast  # pylint: disable=g-import-not-at-top
  nb = json.loads(open(os.path.join(REPO, "notebooks", "colab_tpu.ipynb")).read())
  values = {}
  for cell in nb["cells"]:
    if cell["cell_type"] == "code":
      for node in ast.parse("".join(cell["source"])).body:
        if (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id in ("CONFIG", "OVERRIDES", "JAX_PACKAGE")):
          values[node.targets[0].id] = ast.literal_eval(node.value)
  assert values == {"CONFIG": "configs/livec.py", "OVERRIDES": {}, "JAX_PACKAGE": "jax[tpu]"}
  rows = json.loads(open(os.path.join(REPO, "benchmarks", "results", "aot_table.json")).read())
  colab = rows["b16-mcpf-v5e-1-32"]
  assert "--config configs/livec.py --topology v5e-1" in colab["command"] and "--steps=train,eval" in colab["command"]
  r = colab["report"]
  assert colab["exit"] == 0 and r["fits"] and r["devices"] == 1 and r["device_kind"] == "TPU v5 lite"
  assert not r["eval"].get("skipped")
  config = _config("livec")  # what the notebook trains, field by field where the compiled program depends on it
  assert (r["clip"], r["global_batch"], r["model"], r["trainable"], r["dtype"], r["remat"]) == (
      config.clip.name, config.train.batch_size, config.model.name, config.model.trainable, config.clip.dtype,
      config.clip.remat)
  assert r["eval"]["images_per_step"] == config.eval.batch_size * config.eval.num_crops


@needs_libtpu
def test_gradient_accumulation_flops_count_every_micro_batch(tmp_path):
  """accumulate_steps=2 scans two micro-batches; XLA counts a loop body once, the report must not."""
  rc, r, log = _aot(tmp_path, "--config", "configs/smoke.py", "--topology", "v5e:2x2", "--steps=train",
                    "--config.train.accumulate_steps=2", "--config.clip.tiny.width=256",
                    "--config.model.fusion_width=64")
  assert rc == 0, log
  assert "micro-batch x accumulate_steps=2" in r["flops_method"]
  _check_flops(r, 0.05)
