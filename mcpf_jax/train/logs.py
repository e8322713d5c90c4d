"""Logging of the command-line programs: our INFO lines readable, orbax's per-save INFO chatter only on request.

orbax logs some forty INFO lines per checkpoint save through absl logging (the "absl" logger, whatever the
module), which drowns the progress and summary lines. absl has no per-module verbosity in Python, so a filter
drops INFO and DEBUG records whose source file lies inside the named packages; their warnings and errors pass,
except the EXPECTED_WARNINGS, which restate what was asked, and the tracebacks of failed background saves
(logged at debug level: the program names the failure in one line).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from absl import flags

QUIET_PACKAGES = ("orbax",)
# Warnings that only restate what the program asked for (eval.py and the Scorer open checkpoints read-only).
EXPECTED_WARNINGS = ("Given directory is read only",)


class BelowWarningFrom(logging.Filter):
  """Drops records below WARNING logged from files inside any of `packages` (matched as a path component)."""

  def __init__(self, packages: Sequence[str]):
    super().__init__()
    self.parts = tuple(f"{os.sep}{p}{os.sep}" for p in packages)

  def filter(self, record: logging.LogRecord) -> bool:
    if not any(p in record.pathname for p in self.parts):
      return True
    if record.levelno == logging.WARNING and str(record.msg).startswith(EXPECTED_WARNINGS):
      return False
    if record.levelno >= logging.ERROR and record.exc_info:
      # A background save that failed (no space, no permission): orbax logs a traceback from each of its threads;
      # the program reports the failure in one line (checkpoints.CheckpointSaveError), the tracebacks go to debug.
      logging.getLogger("mcpf_jax.orbax").debug("%s", record.getMessage(), exc_info=record.exc_info)
      return False
    return record.levelno >= logging.WARNING


def quiet_library_info(packages: Sequence[str] = QUIET_PACKAGES) -> BelowWarningFrom | None:
  """Installs `BelowWarningFrom(packages)` on the absl logger, unless --verbosity (-v) was given explicitly.

  Call after absl parsed the flags (in `main`). Returns the filter (None when the user asked for verbosity).
  """
  if "verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].present:
    return None
  quiet = BelowWarningFrom(packages)
  logging.getLogger("absl").addFilter(quiet)
  # jax's own INFO lines (e.g. "Unable to initialize backend 'tpu'" on every machine without one) go through its
  # module loggers, not absl's.
  logging.getLogger("jax").setLevel(logging.WARNING)
  # fsspec (under gcsfs, for a gs:// run folder): an INFO line for every file read.
  logging.getLogger("fsspec").setLevel(logging.WARNING)
  return quiet


class TracebacksToDebug(logging.Filter):
  """Sends records that carry a traceback to the debug log (the program reports the failure in one line)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR and record.exc_info:
      logging.getLogger("mcpf_jax.orbax").debug("%s", record.getMessage(), exc_info=record.exc_info)
      return False
    return True


def _closed_loop_to_debug(previous):
  """An unraisable-exception hook that sends "Event loop is closed" (TensorStore callbacks that reach orbax's event
  loop after a failed save or restore closed it, one traceback each) to the debug log; anything else to `previous`.
  """
  def hook(unraisable) -> None:
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
      logging.getLogger("mcpf_jax.orbax").debug("after a failed save or restore: %s", unraisable.exc_value)
      return
    previous(unraisable)
  return hook


def start_program() -> bool:
  """The start of train.py and eval.py, after absl parsed the flags: INFO logging in our format, orbax's INFO
  lines hidden (`quiet_library_info`), and jax.distributed started as the launch flags and the detected cluster
  ask (`launch.initialize`; raises launch.LaunchError for a start that cannot form its job). Returns True for a
  multi-process job."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  quiet_library_info()
  sys.unraisablehook = _closed_loop_to_debug(sys.unraisablehook)
  # The write tasks of a failed save, collected at exit: "Task exception was never retrieved", a traceback each.
  logging.getLogger("asyncio").addFilter(TracebacksToDebug())
  from mcpf_jax.train import launch  # pylint: disable=g-import-not-at-top
  return launch.initialize()
