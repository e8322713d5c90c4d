"""Per-target speed choices: the attention implementation and the images per vision-tower pass a platform gets.

Every choice gives the same numbers; only the speed differs (BENCHMARKS.md has the measurements). The platform
comes in from the caller: the target the model compiles for (`CLIPConfig.target_platform()`); a None reaches
`config.resolve_platform`, the one place that falls back to the process's default backend.
"""

from __future__ import annotations

from mcpf_jax.clip.config import resolve_platform


def attention_for(platform: str) -> str:
  """The attention path for a target platform: "per_head" (`layers._attention`) on CPU, "fused" on GPU/TPU."""
  return "per_head" if platform == "cpu" else "fused"


CPU_CHUNK_MIN_WIDTH = 256  # the CPU default chunks only real-size towers (a tiny model's small matmuls gain nothing)


def chunking(n: int, image_chunk: int | None, width: int | None = None,
              platform: str | None = None) -> tuple[int, int]:
  """(chunk size, padded batch) to encode n images in chunks of at most `image_chunk` (`CLIPConfig.image_chunk`).

  `width`: the vision tower's width; with image_chunk None, towers narrower than CPU_CHUNK_MIN_WIDTH are not
  chunked, and only a CPU `platform` (the target; None = this process's default backend) chunks at all. A divisor
  of n down to half the chunk is used as it is; otherwise the batch is padded to equal chunks.
  """
  if image_chunk is None:
    real_size = width is None or width >= CPU_CHUNK_MIN_WIDTH
    chunk = 8 if resolve_platform(platform) == "cpu" and real_size else 0
  else:
    chunk = image_chunk
  if chunk <= 0 or n <= chunk:
    return n, n
  for size in range(chunk, max(chunk // 2, 1) - 1, -1):
    if n % size == 0:
      return size, n
  count = -(-n // chunk)
  size = -(-n // count)
  return size, count * size


