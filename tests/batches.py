"""A random training batch in the format of mcpf_jax.train.step (shared by the model and train-step tests)."""

import numpy as np


def iqa_batch(n: int, image_size: int, seed: int = 0, has_scene=None, has_distortion=None) -> dict[str, np.ndarray]:
  """n examples of uint8 images [n, S, S, 3] with MOS on [0, 1], 5 levels, one scene and one distortion each.

  has_scene / has_distortion: per-example masks (repeated to n); default all ones.
  """
  rng = np.random.default_rng(seed)
  mos01 = rng.uniform(size=n).astype(np.float32)
  scene = np.zeros((n, 9), np.float32)
  scene[np.arange(n), rng.integers(0, 9, n)] = 1
  mask = lambda m: np.resize(np.asarray([1.0] if m is None else m, np.float32), n)
  return {
      "image": rng.integers(0, 256, (n, image_size, image_size, 3), dtype=np.uint8),
      "mos01": mos01, "mos_std01": np.full((n,), 0.1, np.float32),
      "level": np.minimum((mos01 * 5).astype(np.int32), 4),
      "scene": scene, "has_scene": mask(has_scene),
      "distortion": rng.integers(0, 11, n).astype(np.int32), "has_distortion": mask(has_distortion),
  }
