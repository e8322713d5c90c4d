"""Mutation check of the MCPF math: each mistake below, applied to a copy of the package, must fail a test.

  python tests/mutations/run.py [NAME ...] [--tests tests/test_reference_math.py]   # run by hand, not by CI

For every mutation: copy the repository (mcpf_jax/, configs/, tests/, pyproject.toml) into a temporary folder, make
the one edit (an exact, single-occurrence string replacement; the script stops if the code it edits has changed),
run the tests in that copy, and report CAUGHT (some test failed) or MISSED. Exit status 1 if any is missed.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[2]
F, I, L = "mcpf_jax/model/fusion.py", "mcpf_jax/model/iqa.py", "mcpf_jax/clip/layers.py"
S = "mcpf_jax/clip/siglip.py"
MAP = 'MAPHead(cfg, self.dtype, self.attention, name="head")(pooled_tokens)'
T2V, V2T = 't + attn("text_from_vision")(t, v)', 'v + attn("vision_from_text")(v, t)'

MUTATIONS = {
    "none": [],  # the baseline, run first: the unmutated copy must pass, or a CAUGHT would mean nothing
    # The three of the structure issue: swapped attention directions, text prompt j paired with visual j+1,
    # a residual dropped.
    "swap_attention_directions": [(F, T2V, 't + attn("vision_from_text")(t, v)'),
                                  (F, V2T, 'v + attn("text_from_vision")(v, t)')],
    "swap_queries_and_keys": [(F, T2V, 't + attn("text_from_vision")(v, t)'),
                              (F, V2T, 'v + attn("vision_from_text")(t, v)')],
    "self_instead_of_cross_attention": [(F, T2V, 't + attn("text_from_vision")(t, t)'),
                                        (F, V2T, 'v + attn("vision_from_text")(v, v)')],
    "text_prompt_j_with_visual_prompt_j+1": [(F, "          text[j], vision[j])", "          text[j], vision[j + 1])")],
    "drop_attention_residual": [(F, f"({T2V})", '(attn("text_from_vision")(t, v))')],
    "drop_backprojection_residual": [(F, "text_out = text + dense(", "text_out = 0 * text + dense(")],
    # Others of the same kind.
    "layernorm_before_residual": [(F, f'nn.LayerNorm(dtype=self.dtype, name="text_norm")({T2V})',
                                   't + nn.LayerNorm(dtype=self.dtype, name="text_norm")('
                                   'attn("text_from_vision")(t, v))')],
    "block_j_gets_prompt_j-1": [(L, "batched(deep_prompts[i - 1],", "batched(deep_prompts[max(i - 2, 0)],")],
    "text_prompts_one_position_late": [(L, "return jnp.concatenate([x[:, :1], prompt, x[:, 1 + n:]], axis=1)",
                                        "return jnp.concatenate([x[:, :2], prompt, x[:, 2 + n:]], axis=1)")],
    "mpiqe_unnormalised_evidence": [(I, "      evidence = _normalize(evidence)\n", "")],
    "mpiqe_drop_image_residual": [(I, "quality = image + nn.Dense(", "quality = 0 * image + nn.Dense(")],
    "score_levels_from_0": [(I, "levels = jnp.arange(1, logits.shape[-1] + 1, dtype=jnp.float32)",
                             "levels = jnp.arange(0, logits.shape[-1], dtype=jnp.float32)")],
    # SigLIP (tests/test_reference_math.py's SigLIP forward): the first token pooled instead of the MAP head (the
    # head's parameters kept, so only the pooling differs); the backbone's logit bias dropped from the class logits.
    "siglip_pool_first_token": [(S, f"return {MAP}, x", f"return ({MAP}, pooled_tokens[:, 0])[1], x")],
    "siglip_drop_logit_bias": [(I, "bias = jnp.reshape(self.clip.logit_bias, ()).astype(jnp.float32) if siglip "
                                   "else 0.0", "bias = 0.0")],
}


def mutate(root: pathlib.Path, name: str) -> None:
  for path, old, new in MUTATIONS[name]:
    f = root / path
    text = f.read_text()
    if text.count(old) != 1:
      raise SystemExit(f"{name}: {path} has {text.count(old)} occurrences of {old!r}, expected 1: update MUTATIONS")
    f.write_text(text.replace(old, new))


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("names", nargs="*", help=f"mutations to try (default: all of {sorted(MUTATIONS)})")
  p.add_argument("--tests", nargs="+", default=["tests/test_reference_math.py"], help="test files to run")
  args = p.parse_args()
  missed = []
  for name in ["none", *(n for n in (args.names or MUTATIONS) if n != "none")]:
    with tempfile.TemporaryDirectory() as tmp:
      root = pathlib.Path(tmp)
      for part in ("mcpf_jax", "configs", "tests"):
        shutil.copytree(REPO / part, root / part, ignore=shutil.ignore_patterns("__pycache__"))
      shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
      mutate(root, name)
      env = dict(os.environ, PYTHONPATH=str(root), JAX_PLATFORMS="cpu")
      # The copy must be what the tests import, or nothing was tested.
      probe = subprocess.run([sys.executable, "-c", "import mcpf_jax; print(mcpf_jax.__file__)"], cwd=root, env=env,
                             capture_output=True, text=True, check=True).stdout.strip()
      assert probe.startswith(str(root)), probe
      proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *args.tests],
                            cwd=root, env=env, capture_output=True, text=True, check=False)
      failed = [line.split(" ")[1] for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
      if name == "none":
        if proc.returncode != 0:
          raise SystemExit(f"the unmutated copy fails its tests:\n{proc.stdout[-3000:]}")
        print(f"baseline: {proc.stdout.strip().splitlines()[-1]}", flush=True)
        continue
      # CAUGHT only for a failing test (exit 1); a collection or usage error (2, 4, 5) is not a catch.
      status = "CAUGHT" if proc.returncode == 1 and failed else ("MISSED" if proc.returncode == 0 else "ERROR")
      if status != "CAUGHT":
        missed.append(name)
      print(f"{status}  {name}: {failed[0] if failed else proc.stdout.strip().splitlines()[-1]}", flush=True)
  return 1 if missed else 0


if __name__ == "__main__":
  sys.exit(main())
