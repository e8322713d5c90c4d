"""benchmarks/gpu.sh keeps working without a GPU: its dry mode runs every kind of row on the CPU and writes the JSON.

The dry run executes the real code paths (our train step, the encoder, transformers' CLIPModel with MaPLe's prompts,
the matmul probe, the parity check of the torch MaPLe against our `maple` model) on a tiny CLIP, in worker
processes, as the GPU run does. The budget tests check what a run cut short leaves behind.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu.sh"

TOP_KEYS = {"benchmark", "date", "dry", "command", "budget_s", "machine", "peaks_tflops", "mfu_method", "settings",
            "same", "different", "rows", "comparisons", "complete", "elapsed_s"}
ROW_KEYS = {"name", "framework", "task", "backbone", "variant", "dtype", "status", "wall_s", "device", "platform",
            "versions"}
RATE_KEYS = {"batch", "setup_s", "lower_s", "compile_s", "first_step_s", "images_per_s", "step_ms",
             "window_ms_per_step", "model_gflop_per_step", "achieved_tflops", "mfu", "mfu_peak", "matmul_arithmetic",
             "peak_bytes_in_use", "peak_gib", "bytes_limit", "memory_note"}
TRAIN_KEYS = RATE_KEYS | {"loss", "trainable_params", "total_params", "backbone_params", "text_rows", "text_tokens",
                          "vision_tokens"}
EXPECTED = {
    "jax_train_b16_bf16_mcpf": TRAIN_KEYS | {"xla_plan_gib", "xla_gflop"},
    "torch_train_b16_bf16_maple": TRAIN_KEYS | {"attn_implementation", "autocast"},
    "jax_encode_b16_fp32": RATE_KEYS | {"xla_plan_gib", "xla_gflop", "vision_tokens"},
    "matmul_peak": {"n", "bf16_tflops", "f32_default_tflops", "f32_highest_tflops", "f32_default_over_highest",
                    "default_matmul_precision", "peak_bytes_in_use"},
    "torch_encode_b16_bf16": RATE_KEYS | {"attn_implementation", "vision_tokens"},
    "parity_maple_jax_vs_torch": {"loss_jax", "loss_torch", "loss_abs_diff", "score_max_abs_diff",
                                  "quality_logits_max_abs_diff", "prompt_grad_max_abs_diff",
                                  "prompt_grad_relative_diff"},
}


def _run(tmp_path: pathlib.Path, *args: str, timeout: float) -> tuple[subprocess.CompletedProcess, dict]:
  out = tmp_path / "gpu.json"
  env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu")
  proc = subprocess.run(["bash", str(SCRIPT), "--out", str(out), *args], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  return proc, json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.torch
def test_dry_run_writes_every_field(tmp_path):
  proc, report = _run(tmp_path, "--dry", timeout=900)
  assert set(report) >= TOP_KEYS, TOP_KEYS - set(report)
  assert report["dry"] is True and report["benchmark"] == "gpu"
  rows = {r["name"]: r for r in report["rows"]}
  assert set(rows) == set(EXPECTED)
  for name, keys in EXPECTED.items():
    row = rows[name]
    assert row["status"] == "ok", (name, row.get("error"), row.get("traceback_tail"), proc.stderr[-3000:])
    missing = (ROW_KEYS | keys) - set(row)
    assert not missing, (name, missing)
  for name in ("jax_train_b16_bf16_mcpf", "torch_train_b16_bf16_maple", "jax_encode_b16_fp32",
               "torch_encode_b16_bf16"):
    row = rows[name]
    assert row["images_per_s"] > 0 and row["step_ms"] > 0 and row["model_gflop_per_step"] > 0, row
    assert row["mfu"] > 0 and "dry run" in row["mfu_peak"]
    # On the CPU there is no device memory statistic: the fields are there, empty, and say why.
    assert row["peak_bytes_in_use"] is None and row["memory_note"]
  for name in ("jax_train_b16_bf16_mcpf", "torch_train_b16_bf16_maple"):
    row = rows[name]
    assert math.isfinite(row["loss"])
    # The backbone is frozen: everything else (prompts, fusion or coupling) trains.
    assert row["trainable_params"] > 0 and row["total_params"] - row["trainable_params"] == row["backbone_params"]
  # The same CLIP sizes in both frameworks.
  assert rows["torch_train_b16_bf16_maple"]["backbone_params"] == rows["jax_train_b16_bf16_mcpf"]["backbone_params"]
  assert rows["jax_train_b16_bf16_mcpf"]["compile_s"] > 0
  assert rows["torch_train_b16_bf16_maple"]["vision_tokens"] == rows["jax_train_b16_bf16_mcpf"]["vision_tokens"]
  assert rows["torch_train_b16_bf16_maple"]["text_tokens"] == rows["jax_train_b16_bf16_mcpf"]["text_tokens"]
  # The torch MaPLe computes what our maple variant computes (same weights and prompts, float32).
  parity = rows["parity_maple_jax_vs_torch"]
  assert parity["loss_abs_diff"] < 1e-4 * max(1.0, abs(parity["loss_jax"])), parity
  assert parity["score_max_abs_diff"] < 1e-4, parity
  assert parity["prompt_grad_relative_diff"] < 1e-3, parity
  assert "jax_train_b16_bf16_mcpf / torch_train_b16_bf16_maple" in report["comparisons"]
  assert report["complete"] is True
  assert "parity (maple, float32, CPU)" in proc.stdout and "img/s" in proc.stdout


def test_budget_spent_skips_rows_and_still_writes_the_json(tmp_path):
  _, report = _run(tmp_path, "--dry", "--rows", "matmul_peak", "jax_encode_b16_fp32", "--budget_s", "1",
                   "--min_row_s", "5", timeout=120)
  assert [r["status"] for r in report["rows"]] == ["skipped"] * 3  # the two rows and the parity row of --dry
  assert all("budget" in r["error"] for r in report["rows"])
  assert report["complete"] is False


def test_a_row_past_its_cap_is_killed_and_reported(tmp_path):
  # Two seconds cannot import jax, build a model and compile a train step: the worker is killed, the row says so.
  _, report = _run(tmp_path, "--dry", "--rows", "jax_train_b16_bf16_mcpf", "--budget_s", "2", "--min_row_s", "0",
                   timeout=120)
  # --dry runs its rows (here this one and the parity row) in one worker: both are cut.
  assert [r["name"] for r in report["rows"]] == ["jax_train_b16_bf16_mcpf", "parity_maple_jax_vs_torch"]
  for row in report["rows"]:
    assert row["status"] == "timeout" and "killed after" in row["error"], row
  assert report["complete"] is False


def test_unknown_row_is_refused(tmp_path):
  env = dict(os.environ, PYTHON=sys.executable)
  proc = subprocess.run(["bash", str(SCRIPT), "--dry", "--out", str(tmp_path / "x.json"), "--rows", "jax_train_b99"],
                        env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode != 0
  assert "jax_train_b99" in proc.stderr and "jax_train_b16_bf16_mcpf" in proc.stderr


def test_without_a_gpu_the_rows_fail_fast_and_say_why(tmp_path):
  # Not --dry: a JAX that fell back to the CPU, or a torch without CUDA, is an error at once, not a row that spends
  # its whole time cap computing a real-size model on the CPU.
  _, report = _run(tmp_path, "--rows", "matmul_peak", "torch_encode_b16_fp32", timeout=300)
  rows = {r["name"]: r for r in report["rows"]}
  assert rows["matmul_peak"]["status"] == "error" and "not a GPU" in rows["matmul_peak"]["error"]
  assert rows["torch_encode_b16_fp32"]["status"] == "error" and "CUDA" in rows["torch_encode_b16_fp32"]["error"]
  assert all(r["wall_s"] < 120 for r in report["rows"]), report["rows"]
