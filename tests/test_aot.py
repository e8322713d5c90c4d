"""The ahead-of-time pre-flight (mcpf_jax.aot): real libtpu compiles for TPU topologies this machine does not have.

The compiles run `python -m mcpf_jax.aot` in a subprocess (the command users run; JAX_PLATFORMS=cpu there too, so
libtpu is only ever the compiler, never a runtime backend of the tests), with ALLOW_MULTIPLE_LIBTPU_LOAD=1 (libtpu
takes a process lock that two pytest-xdist workers would otherwise fight over) and TPU_LOG_DIR in tmp_path.
libtpu comes from where the tool itself finds it (`aot.find_libtpu`): on a CPU machine the folder `make test` fills,
<venv>/aot-libtpu, outside site-packages. They are skipped, with the reason, where there is none.
"""

import importlib.metadata
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

LIBTPU = aot.find_libtpu()
needs_libtpu = pytest.mark.skipif(LIBTPU is None, reason="no libtpu (`make aot-libtpu`; README: Pre-flight)")
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
  """XLA's count of what the devices run vs the analytic count of the same work (class prompts split over data)."""
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
  # libtpu, loaded as the compiler only, says nothing about the TPU worker this machine is not.
  for noise in ("E0000", "INVALID_ARGUMENT", "TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "host bounds"):
    assert noise not in log, log
  assert "8 x TPU v5 lite on 2 host(s) of 4 devices, 1 slice(s)" in log
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
  # Data parallelism: the prompt gradients (and metrics) are all-reduced; the one all-gather is the class prompts'
  # text features (each device encodes its share of the 25 rows, padded to 32): a few KB, no weight is gathered.
  assert r["collectives"]["all-reduce"]["count"] >= 1
  assert r["collectives"]["all-gather"]["count"] == 1 and r["collectives"]["all-gather"]["bytes"] < 64 * 2 ** 10
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


def _run(*args: str, env: dict | None = None, python: str = sys.executable) -> subprocess.CompletedProcess:
  return subprocess.run([python, "-m", "mcpf_jax.aot", *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)


def test_help_exits_0_under_the_module_name():
  proc = _run("--help")
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith("Pre-flight: compile")
  assert "\nmcpf_jax.aot:\n  --chips_per_host:" in proc.stdout
  for flag in ("--config:", "--topology:", "--num_slices:", "--steps:", "--mfu:"):
    assert f"\n  {flag}" in proc.stdout
  assert os.sep + "aot.py" not in proc.stdout  # absl's heading for __main__ is the file's path
  assert "--alsologtostderr" not in proc.stdout and "--helpfull" in proc.stdout and proc.stderr == ""
  full = _run("--helpfull")
  assert full.returncode == 0 and "\nmcpf_jax.aot:\n" in full.stdout and "--verbosity" in full.stdout


def test_without_libtpu_the_error_says_what_to_install(tmp_path):
  """A Python environment that has the runtime packages but no libtpu anywhere: exit 1, and the command that fixes
  it, for this jax, into that environment's own aot-libtpu folder."""
  if importlib.util.find_spec("libtpu") is not None:
    pytest.skip("libtpu is importable here (a TPU VM's jax[tpu]): no environment without it to make")
  env_dir = tmp_path / "env"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
  python = str(env_dir / "bin" / "python")
  site = [p for p in sys.path if p.endswith("site-packages")]
  env = {k: v for k, v in os.environ.items() if k != "TPU_LIBRARY_PATH"}
  env["PYTHONPATH"] = os.pathsep.join([REPO, *site])  # jax and the rest, without this venv's prefix
  proc = _run("--config", "configs/smoke.py", "--topology", "v5e-8", env=env, python=python)
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert "Traceback" not in proc.stderr and proc.stdout == ""
  assert proc.stderr.startswith("error: --topology='v5e-8' is a TPU target: compiling for it needs libtpu"), proc.stderr
  want = (f"{python} -m pip install --no-deps --target {env_dir}{os.sep}aot-libtpu "
          f"'{aot.libtpu_requirement()}'")
  assert want in proc.stderr and "make aot-libtpu" in proc.stderr and "TPU_LIBRARY_PATH" in proc.stderr
  assert f"pip install 'jax[tpu]=={jax.__version__}'" in proc.stderr
  env["TPU_LIBRARY_PATH"] = str(tmp_path / "missing" / "libtpu.so")
  proc = _run("--config", "configs/smoke.py", "--topology", "v5e-8", env=env, python=python)
  assert proc.returncode == 1 and f"TPU_LIBRARY_PATH='{tmp_path}/missing/libtpu.so' is not a file" in proc.stderr


def test_libtpu_is_the_one_jax_pins_and_stays_out_of_site_packages():
  """The requirement comes from jax's own `tpu` extra; libtpu from <venv>/aot-libtpu is not importable in the venv
  (where jax would start it as a backend in every command)."""
  from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
  requirement = Requirement(aot.libtpu_requirement())
  assert requirement.name == "libtpu" and str(requirement.specifier).startswith("==")
  folder = aot.libtpu_folder()
  if LIBTPU is None or not LIBTPU.startswith(folder + os.sep):
    pytest.skip(f"libtpu is not from {folder} here ({LIBTPU})")
  assert importlib.util.find_spec("libtpu") is None
  (dist,) = importlib.metadata.distributions(path=[folder])
  assert dist.metadata["Name"] == "libtpu" and requirement.specifier.contains(dist.version), (dist.version,
                                                                                             requirement)


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
