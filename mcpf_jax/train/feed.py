"""Is the accelerator fed? The training loop's wait for the next batch against the rest of the loop.

`Feed` wraps the device-batch iterator: it times each `next` (the loop waiting for the input) and, per log window,
compares two rates over the same images: the input rate (images / the window's wall time: what the input delivered,
the loop's rate) and the step rate (images / the time not spent waiting for a batch: what the steps, dispatch and
metric fetches included, would sustain with batches always ready). When the loop waits for batches more than
`threshold` of its time, the input rate is below the step rate by that much and `check` logs one warning naming
both rates and the knob (data.num_workers); once per run, so a slow host does not flood the log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("mcpf_jax")

# A window waiting for input more than this fraction of its time is under-fed (input rate < 0.8 x step rate).
THRESHOLD = 0.2


class Feed:
  """Times the loop's waits for batches; `check` at log steps warns once when the input is the bottleneck.

  Args:
    batches: the device-batch iterator the loop takes its batches from.
    images_per_step: the global batch.
    num_workers, num_threads, cores: the input's sizes and the host's cores, named in the warning.
    threshold: the waiting fraction of a window above which it warns.
  """

  def __init__(self, batches: Iterator[Any], images_per_step: int, num_workers: int, num_threads: int, cores: int,
               threshold: float = THRESHOLD):
    self._batches = batches
    self._images = images_per_step
    self._sizes = (num_workers, num_threads, cores)
    self._threshold = threshold
    self.warned = False
    self.reset()

  def reset(self) -> None:
    """Starts a new window now (after the first step, a checkpoint or a validation: their time is not the loop's)."""
    self._start, self._wait, self._steps = time.perf_counter(), 0.0, 0

  def __next__(self) -> Any:
    t = time.perf_counter()
    batch = next(self._batches)
    self._wait += time.perf_counter() - t
    self._steps += 1
    return batch

  def rates(self) -> tuple[float, float, float]:
    """(input img/s, step img/s, waiting fraction) of the window so far."""
    elapsed = max(time.perf_counter() - self._start, 1e-9)
    images = self._steps * self._images
    busy = max(elapsed - self._wait, 1e-9)
    return images / elapsed, images / busy, self._wait / elapsed

  def check(self, step: int) -> str | None:
    """At a log step: the warning (logged, once per run) when the window waited for input more than `threshold`
    of its time; then a new window. Returns the warning, or None."""
    message = None
    if self._steps and not self.warned:
      input_rate, step_rate, waiting = self.rates()
      if waiting > self._threshold:
        workers, threads, cores = self._sizes
        message = (f"input-bound at step {step}: the input delivers {input_rate:.1f} images/s, the steps take "
                   f"{step_rate:.1f} images/s (the loop waited for batches {100 * waiting:.0f}% of the time); "
                   f"raise data.num_workers (now {workers} worker processes x {threads} read threads, this host "
                   f"has {cores} cores), or store pre-resized images (prepare --resize)")
        log.warning("%s", message)
        self.warned = True
    self.reset()
    return message
