"""Built-in smoke data: real photos from scikit-image with synthetic distortions at known levels.

The smoke run must work offline in minutes, so its data are the sample photos that ship INSIDE the
scikit-image wheel (no pooch download), each resized to `short_side` pixels on its short side and degraded by
three distortions at five known strengths:

| distortion | level 1 .. 5                                     | file |
|------------|--------------------------------------------------|------|
| blur       | Gaussian blur, sigma = 0.5, 1, 2, 3, 5 px        | PNG  |
| noise      | additive white Gaussian noise, std = 4, 8, 16, 32, 64 (of 255), clipped to [0, 255] | PNG  |
| jpeg       | JPEG compression, quality = 40, 20, 10, 5, 2 (PIL) | JPEG |

The pristine photo (level 0) is written as a PNG too. Its MOS is a known decreasing function of the level,
the same for all three distortions:

    mos = 5.0 - 0.8 * level        (level 0 -> 5.0, level 5 -> 1.0; higher is better)

so 12 photos x (1 + 3 x 5) = 192 images. `content_id` is the photo name: a split by content keeps every
version of a photo on one side. Gray photos (camera, coins, moon, grass) stay 8-bit grayscale files, so the
decoder's gray path is exercised too.

Everything is deterministic: fixed noise seeds (per photo and level), fixed PIL encoders, no timestamps in the
files. Writing takes a few seconds.
"""

import csv
import os
import pathlib
import shutil
import zlib
from collections.abc import Callable

import numpy as np
import PIL.Image
import scipy.ndimage
import skimage.data

# Photos shipped inside the scikit-image package (checked: none of them needs a pooch download).
PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": skimage.data.astronaut,
    "camera": skimage.data.camera,
    "chelsea": skimage.data.chelsea,
    "coffee": skimage.data.coffee,
    "coins": skimage.data.coins,
    "grass": skimage.data.grass,
    "hubble_deep_field": skimage.data.hubble_deep_field,
    "immunohistochemistry": skimage.data.immunohistochemistry,
    "moon": skimage.data.moon,
    "motorcycle": lambda: skimage.data.stereo_motorcycle()[0],
    "retina": skimage.data.retina,
    "rocket": skimage.data.rocket,
}

BLUR_SIGMAS = (0.5, 1.0, 2.0, 3.0, 5.0)
NOISE_STDS = (4.0, 8.0, 16.0, 32.0, 64.0)
JPEG_QUALITIES = (40, 20, 10, 5, 2)
DISTORTIONS = ("blur", "noise", "jpeg")
NUM_LEVELS = 5

CSV_NAME = "smoke.csv"
CSV_COLUMNS = ("path", "mos", "content_id", "distortion", "level")
MOS_RANGE = (1.0, 5.0)

# How the generic csv dataset reads the smoke CSV (fields of mcpf_jax.data.CsvConfig; manual_dir = the folder):
#   mcpf_jax.data.builder("csv", data_dir=D, config_name="smoke", **CSV_CONFIG).download_and_prepare(
#       download_config=tfds.download.DownloadConfig(manual_dir=folder))
# or: python -m mcpf_jax.data.prepare csv --manual_dir FOLDER --data_dir D --config_name smoke \
#       --csv_path smoke.csv --image_column path --mos_column mos --content_column content_id --mos_range 1 5
CSV_CONFIG = {"csv_path": CSV_NAME, "image_column": "path", "mos_column": "mos", "content_column": "content_id",
              "higher_is_better": True, "mos_range": MOS_RANGE}


def mos_of_level(level: int) -> float:
  """The smoke MOS of a distortion level (0 = pristine .. 5 = strongest); higher is better, in [1, 5]."""
  if not 0 <= level <= NUM_LEVELS:
    raise ValueError(f"smoke distortion level must be in [0, {NUM_LEVELS}], got {level}")
  return 5.0 - 0.8 * level


def _resize_short_side(img: np.ndarray, short_side: int) -> np.ndarray:
  """[H, W(, 3)] uint8 -> the same with min(H, W) == short_side (bicubic, PIL)."""
  h, w = img.shape[:2]
  scale = short_side / min(h, w)
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  return np.asarray(PIL.Image.fromarray(img).resize(size, PIL.Image.Resampling.BICUBIC))


def blur(img: np.ndarray, sigma: float) -> np.ndarray:
  # No blur across colour channels: sigma 0 on the channel axis.
  sigmas = (sigma, sigma) + (0.0,) * (img.ndim - 2)
  out = scipy.ndimage.gaussian_filter(img.astype(np.float32), sigmas, mode="reflect")
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def noise(img: np.ndarray, std: float, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  out = img.astype(np.float32) + rng.normal(0.0, std, img.shape).astype(np.float32)
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _write_png(img: np.ndarray, path: pathlib.Path) -> None:
  PIL.Image.fromarray(img).save(path, format="PNG", compress_level=1)


def _write_jpeg(img: np.ndarray, path: pathlib.Path, quality: int) -> None:
  PIL.Image.fromarray(img).save(path, format="JPEG", quality=quality)


def write_smoke_dataset(folder: str | pathlib.Path, *, short_side: int = 256,
                        photos: tuple[str, ...] | None = None) -> pathlib.Path:
  """Writes the smoke images and their CSV into `folder`; returns the CSV path.

  Layout: `folder/images/{photo}_{distortion}{level}.{png,jpg}` (`{photo}_pristine.png` for level 0) and
  `folder/smoke.csv` with columns `path` (relative to the CSV's folder), `mos` (see `mos_of_level`),
  `content_id` (the photo), `distortion` (`pristine`, `blur`, `noise` or `jpeg`) and `level` (0..5).

  Args:
    folder: output folder (created if missing; files already there are overwritten).
    short_side: short side of the written images in pixels.
    photos: a subset of `PHOTOS` names (default: all 12).

  Returns:
    Path of the CSV.
  """
  folder = pathlib.Path(folder)
  names = tuple(PHOTOS) if photos is None else tuple(photos)
  unknown = sorted(set(names) - set(PHOTOS))
  if unknown:
    raise ValueError(f"unknown smoke photos {unknown}; expected names from {sorted(PHOTOS)}")
  image_dir = folder / "images"
  image_dir.mkdir(parents=True, exist_ok=True)
  rows = []
  for name in names:
    img = _resize_short_side(PHOTOS[name](), short_side)
    rel = f"images/{name}_pristine.png"
    _write_png(img, folder / rel)
    rows.append((rel, mos_of_level(0), name, "pristine", 0))
    # A seed per photo that does not depend on the order or subset of photos.
    photo_seed = zlib.crc32(name.encode())
    for level in range(1, NUM_LEVELS + 1):
      k = level - 1
      rel = f"images/{name}_blur{level}.png"
      _write_png(blur(img, BLUR_SIGMAS[k]), folder / rel)
      rows.append((rel, mos_of_level(level), name, "blur", level))
      rel = f"images/{name}_noise{level}.png"
      _write_png(noise(img, NOISE_STDS[k], seed=photo_seed + level), folder / rel)
      rows.append((rel, mos_of_level(level), name, "noise", level))
      rel = f"images/{name}_jpeg{level}.jpg"
      _write_jpeg(img, folder / rel, JPEG_QUALITIES[k])
      rows.append((rel, mos_of_level(level), name, "jpeg", level))
  csv_path = folder / CSV_NAME
  with open(csv_path, "w", newline="") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for rel, mos, content_id, distortion, level in rows:
      writer.writerow((rel, f"{mos:.4f}", content_id, distortion, level))
  return csv_path


def write_smoke_release(folder: str | pathlib.Path) -> pathlib.Path:
  """`write_smoke_dataset(folder)` whole or not at all: written into a temporary sibling folder and renamed into
  place, so a concurrent builder never reads a half-written image; a folder already there (with its CSV, written
  last) is kept, as the images are a function of the code alone. Returns the CSV path."""
  folder = pathlib.Path(folder)
  if (folder / CSV_NAME).exists():
    return folder / CSV_NAME
  folder.parent.mkdir(parents=True, exist_ok=True)
  tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  write_smoke_dataset(tmp)
  try:
    if folder.exists() and not (folder / CSV_NAME).exists():  # half written in place by an older version
      shutil.rmtree(folder)
    os.rename(tmp, folder)
  except OSError:  # another process put its (identical) copy there first
    shutil.rmtree(tmp, ignore_errors=True)
  return folder / CSV_NAME
