"""Pre-flight: compile a config's train and eval steps ahead of time for a TPU or GPU topology this machine lacks.

  python -m mcpf_jax.aot --config configs/livec.py --topology v5e:2x4 [--num_slices 2] [--config.x=y ...]

The programs are the ones train.py runs: `mcpf_jax.train.step.jit_steps` (same functions, shardings, donation)
on a ("data", "model") mesh made from the config over the TARGET's compile-only devices, lowered from
`jax.ShapeDtypeStruct`s: no weights (the backbone's shapes come from its preset, a known hub id or a folder's
config.json), no dataset. The model's platform-dependent paths (attention kernel, image chunking) are chosen for
the target (`CLIPConfig.platform`), not for this process's CPU backend.

Prints a readable report, then, as its LAST line, one JSON object (keys in `report_keys`). Exit status 0 when
both steps fit in the target's per-device memory, 2 when one does not (the compiler's out-of-memory is caught
and reported, JSON included), 1 on bad input (a message naming the flag).

FLOPs: XLA's `cost_analysis()` of the partitioned (per-device) program; `flops_per_step` = that x devices. A loop
body is counted once by XLA: the CLIP layer stacks are Python loops (unrolled; with `clip.scan_layers` they are
loops, and no XLA count is reported), and for a TPU/GPU target the image chunk loop is off, so the only loop left is
gradient accumulation (`train.accumulate_steps` > 1). Then the FLOPs
come from a second compile of the same step on one micro-batch (accumulate_steps = 1), times accumulate_steps
(`flops_method` says which). `model_flops_per_step` is the analytic count (`mcpf_jax.model.flops`) of the useful
work, each image once and the class prompts' text tower once; `analytic_flops_executed` counts the text tower as
the mesh runs it (the prompt rows padded to a multiple of the "data" axis and split over it, once per micro-batch)
and each image and prompt row once per device of the "model" axis: what `flops_per_step` is checked against
(`flops_vs_analytic`).

TPU targets need libtpu, the TPU compiler (`find_libtpu`): on a TPU VM the one `jax[tpu]` installs; on a CPU-only
machine the one `make aot-libtpu` keeps in <venv>/aot-libtpu, outside site-packages (importable, jax would start it
as a backend in every command of the venv, each then printing libtpu's errors about the TPU it cannot find).
Topology names (`TOPOLOGIES`) are libtpu's "<generation>:<chips per axis>", or the cloud names of common slices
(v5e-8, v4-32, v5p-128, ...).
GPU targets ("h100:1x8", "a100:1x8") use deviceless CUDA compilation (`jax-cuda12-plugin`); see `gpu_topology`.
"""

from __future__ import annotations

import importlib
import json
import sys

# The parts: targets.py the chips, topology names and compile-only devices; compile.py the model as shapes and the
# steps compiled for a target (`preflight`); report.py what the compiled programs say, and the report; __main__.py
# the environment of a compile-only process. Their names are importable from here (`from mcpf_jax.aot import
# preflight`), loaded on first use: `python -m mcpf_jax.aot` imports this package before __main__.py has set the
# environment that jax reads when it is imported.
_PARTS = {
    "targets": ("GiB", "CHIPS", "TOPOLOGIES", "GPU_TOPOLOGIES", "GPU_TARGET_CONFIGS", "LIBTPU_FOLDER", "PreflightError",
                "Target", "libtpu_requirement", "libtpu_folder", "find_libtpu", "install_libtpu_hint", "tpu_topology",
                "gpu_topology", "make_target"),
    "compile": ("clip_config_for", "build", "train_batch_shapes", "eval_batch_shapes", "compile_program",
                "preflight"),
    "report": ("collectives", "report_keys", "format_report"),
}
_PART_OF = {name: part for part, names in _PARTS.items() for name in names}


def __getattr__(name: str):
  part = _PART_OF.get(name)
  if part is None:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  return getattr(importlib.import_module(f"{__name__}.{part}"), name)


def main(argv) -> int:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top

  from mcpf_jax.aot import targets  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  config = f.config
  try:
    target = targets.make_target(f.topology, f.num_slices, f.chips_per_host)
    steps = tuple(x for x in f.steps if x)
    if not steps or set(steps) - {"train", "eval"}:
      raise targets.PreflightError(f"--steps={','.join(f.steps)}: expected 'train', 'eval' or 'train,eval'")
    from mcpf_jax.aot import compile as compile_lib  # pylint: disable=g-import-not-at-top  (after the target's)
    report = compile_lib.preflight(config, target, mfu=f.mfu, steps=steps)
  except targets.PreflightError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  from mcpf_jax.aot import report as report_lib  # pylint: disable=g-import-not-at-top
  print(report_lib.format_report(report))
  print(json.dumps(report, default=float))
  return 0 if report["fits"] else 2


def _define_flags() -> None:
  """The command's flags, defined here so that absl files them under this module's name (`mcpf_jax.aot`, the help's
  heading), not under `__main__`'s file path."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  from mcpf_jax.aot.targets import TOPOLOGIES  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "config file (configs/*.py); --config.<field>=<value> overrides")
  flags.DEFINE_string("topology", None, f"target: {', '.join(sorted(TOPOLOGIES))}, a libtpu name such as "
                      "'v5e:2x4', or a GPU node 'h100:1x8'")
  flags.DEFINE_integer("num_slices", 1, "TPU slices (multi-slice over DCN); the mesh spans all their devices")
  flags.DEFINE_string("chips_per_host", None, "TPU chips per host as 'x,y,z' (default: the cloud slice's, or "
                      "libtpu's for a libtpu name)")
  flags.DEFINE_list("steps", ["train", "eval"], "programs to compile: train, eval or both")
  flags.DEFINE_float("mfu", 0.4, "model FLOPs utilisation assumed for the step time and input rate")
  flags.mark_flags_as_required(["config", "topology"])


HELP_FLAGS = ("-h", "-?", "-help", "--help", "--helpshort", "--helpfull")


def cli(argv: list[str] | None = None) -> None:
  """`python -m mcpf_jax.aot`: parses the flags and exits with main's status; --help prints this module's docstring
  and its flags and exits 0 (absl's own --help exits 1)."""
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  argv = sys.argv if argv is None else argv
  _define_flags()
  if any(a in HELP_FLAGS for a in argv[1:]):
    print(__doc__.rstrip())
    print("\nflags:")
    if "--helpfull" in argv:
      print(flags.FLAGS.get_help())
    else:
      print(flags.FLAGS.module_help(__name__))
      print("\nTry --helpfull for every flag (absl's, e.g. --verbosity, and the libraries').")
    sys.exit(0)
  app.run(lambda rest: sys.exit(main(rest)), argv=argv)
