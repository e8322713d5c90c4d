"""train.py / eval.py --help: exit 0, list what a user of the command needs (its flags and the multi-host launch
flags), and show no file paths (absl heads a module's flags with its file path)."""

import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ("--distributed", "--coordinator_address", "--num_processes", "--process_id", "--heartbeat_timeout_seconds",
          "--shutdown_timeout_seconds", "--initialization_timeout_seconds")
OWN = {"train.py": ("--config", "--workdir"), "eval.py": ("--config", "--workdir", "--checkpoint", "--dataset")}
FIRST_LINE = {"train.py": "Train an IQA model: `python train.py --config", "eval.py": "Evaluate a trained checkpoint"}


def _help(command: str, flag: str, cwd) -> str:
  # Started by its absolute path from elsewhere: absl would show that path as the heading of the command's flags.
  proc = subprocess.run([sys.executable, str(REPO / command), flag], cwd=cwd, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  out = proc.stdout + proc.stderr
  assert str(REPO) not in out and str(cwd) not in out, out
  return proc.stdout


@pytest.mark.parametrize("command", sorted(OWN))
def test_help_exits_0_and_lists_the_commands_flags_and_the_launch_flags(command, tmp_path):
  out = _help(command, "--help", tmp_path)
  assert out.startswith(FIRST_LINE[command])  # the command's docstring first
  assert f"\n{command}:\n" in out  # the heading names the command
  listed = {line.split(":")[0].strip().replace("[no]", "") for line in out.splitlines() if line.startswith("  --")}
  for flag in OWN[command] + LAUNCH:
    assert flag in listed, (flag, out)
  assert "--alsologtostderr" not in out and "--helpfull" in out  # the rest is under --helpfull, and said so
  assert _help(command, "-?", tmp_path) == out


def test_helpfull_exits_0_and_heads_flags_by_module(tmp_path):
  out = _help("train.py", "--helpfull", tmp_path)
  headings = [line[:-1] for line in out.splitlines() if line.endswith(":") and not line.startswith(" ")]
  assert "train.py" in headings and "mcpf_jax.train.launch" in headings and "absl.logging" in headings
  assert all("/" not in h for h in headings), headings
  assert "--verbosity" in out and "--coordinator_address" in out
