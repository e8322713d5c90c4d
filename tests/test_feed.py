"""The under-fed warning (mcpf_jax.train.feed): a real grain pipeline over a slow source feeding a jitted step."""

import logging
import time

import jax
import jax.numpy as jnp

from mcpf_jax import scores
from mcpf_jax.data import pipeline
from mcpf_jax.train import feed as feed_lib
from tests.test_pipeline import RESIZE, S, _source

BATCH = 4


class _SlowSource:
  """Records that take `delay` seconds each to read, like files on a slow network store."""

  def __init__(self, records: list[dict], delay: float):
    self.records, self.delay = records, delay

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, row: int) -> dict:
    time.sleep(self.delay)
    return self.records[row]


@jax.jit
def _step(total, batch):
  return total + jnp.mean(batch["image"].astype(jnp.float32)) * batch["mos01"].sum()


def _loop(source, steps: int, step_seconds: float) -> tuple[feed_lib.Feed, tuple[float, float, float], str | None]:
  """(the Feed, its window's rates, its check) after `steps` steps of `step_seconds` each."""
  score_map = scores.ScoreMap.fit([r["mos"] for r in source.records], higher_is_better=True)
  loader = pipeline.train_loader(source, range(len(source)), batch_size=BATCH, image_size=S, resize=RESIZE, seed=0,
                                 score_map=score_map, num_workers=0, num_threads=1)
  batches = (jax.device_put(b) for b in loader)
  feed = feed_lib.Feed(batches, BATCH, num_workers=0, num_threads=1, cores=pipeline.host_cores())
  total = jnp.zeros(())
  total = _step(total, next(feed))  # compiles
  feed.reset()
  for _ in range(steps):
    total = _step(total, next(feed))
    time.sleep(step_seconds)  # the rest of the step the host waits for (the device's time)
  jax.block_until_ready(total)
  return feed, feed.rates(), feed.check(steps + 1)


def test_a_slow_input_is_named_with_both_rates(caplog):
  # 25 ms per record: ~40 images/s of input against steps of ~2 ms.
  with caplog.at_level(logging.WARNING, logger="mcpf_jax"):
    feed, (_, _, waiting), message = _loop(_SlowSource(_source(12), 0.025), steps=4, step_seconds=0.0)
  assert message is not None and feed.warned and waiting > feed_lib.THRESHOLD
  assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [message]
  input_rate, step_rate = (float(x) for x in
                           (message.split("the input delivers ")[1].split(" images/s")[0],
                            message.split("the steps take ")[1].split(" images/s")[0]))
  assert input_rate < 60 and step_rate > 2 * input_rate
  assert "raise data.num_workers (now 0 worker processes x 1 read threads" in message
  # Once per run: a second under-fed window logs nothing more.
  assert feed.check(99) is None


def test_a_fed_loop_does_not_warn(caplog):
  # The input (tiny PNGs read from memory) is ready long before each 60 ms step ends.
  with caplog.at_level(logging.WARNING, logger="mcpf_jax"):
    feed, (input_rate, step_rate, waiting), message = _loop(_SlowSource(_source(12), 0.0), steps=4,
                                                            step_seconds=0.06)
  assert message is None and not feed.warned and not caplog.records
  assert waiting < feed_lib.THRESHOLD and 0 < input_rate <= step_rate
