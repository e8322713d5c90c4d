"""Image decoding and crop geometry shared by CLIP preprocessing, the data pipeline and scoring.

Everything returns plain numpy `uint8 [height, width, 3]` RGB arrays and is deterministic.

Decoding (`decode`, `load`) uses PIL and turns every mode PIL reads into 8-bit RGB:
  * EXIF orientation is applied (the pixels are rotated/flipped as a viewer shows them). A corrupt EXIF block
    is ignored with a warning naming the file.
  * "1" and "L" (grey) are repeated over the three channels; "P" (palette) is expanded, to RGBA when the palette
    has a transparent entry; "CMYK" (Adobe-inverted JPEGs are recognised by PIL from their APP14 marker),
    "YCbCr", "RGBX", "HSV" are converted by PIL (no ICC colour management).
  * Alpha ("RGBA", "LA", "PA", "P" with transparency, 16-bit grey+alpha PNG): composited on white by default,
    which is what a viewer shows on a white page and does not depend on the arbitrary colours stored under
    transparent pixels; `alpha="drop"` keeps the stored colours (as `PIL.Image.convert("RGB")` does).
  * 16-bit grey ("I;16*", and "I" holding values in 0..65535): v -> round(v / 257), so 65535 -> 255 (scaled,
    never clipped). 16-bit RGB(A) PNG/TIFF: PIL itself keeps the high byte (v >> 8), within 1 of round(v / 257).
    "I" values outside 0..65535 (32-bit or signed data) have no defined 8-bit mapping and are rejected.
  * Float ("F"): values in [0, 1] are scaled by 255, values in [0, 255] are kept; others (and NaN) rejected.
  * Multi-frame files (GIF, TIFF): the first frame.
Undecodable input (empty, truncated, not an image) raises `ImageDecodeError`, which names the file. PIL's global
`LOAD_TRUNCATED_IMAGES` is never touched, so a truncated file is always an error.

Limits the caller sets and may raise: an image with more than `max_pixels` pixels (a decompression-bomb guard, read
from the file's header before decoding) or one that would be enlarged more than `max_upscale` raises `LimitError`,
whose attributes hold the facts (file, size, the limit, the value that would allow it) so that a command line can
give the advice in its own flags' spelling (`LimitError.explain`). `max_pixels` replaces PIL's own guard (the
global `PIL.Image.MAX_IMAGE_PIXELS`) for that call only, without touching the global: a huge JPEG allowed by it is
read at a reduced DCT scale, in the memory of a small one.

Geometry: resizing is PIL's (bicubic by default) on uint8, as CLIP's own preprocessing; a short-side resize
gives the long side `int(size * long / short)` (torchvision and transformers do the same). Images smaller than
a crop are resized up until their short side equals the crop size (`ensure_min_side`), never padded.
"""

from __future__ import annotations

import io
import math
import os
import struct
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

# Refuse images above this many pixels before decoding them (decompression bombs). Equal to PIL's own warning
# threshold (`PIL.Image.MAX_IMAGE_PIXELS`, ~9459^2; PIL refuses twice that). A larger `max_pixels` replaces PIL's
# guard for that call.
DEFAULT_MAX_PIXELS = 89_478_485
ALPHA_MODES = ("white", "drop")
BICUBIC = Image.Resampling.BICUBIC
# `decode(short_side=S)` decodes a JPEG at a reduced DCT scale when its short side is at least this many times S.
DRAFT_MIN_FACTOR = 2
# After a DCT-scaled decode, PIL's resize reduces by whole factors (box filter) down to this many times the target
# before the bicubic step (`Image.resize(reducing_gap=...)`).
REDUCING_GAP = 2.0
# What counts as an image file, by extension (lower case): a folder of users' images is listed by it
# (scoring.find_images) and a release's folders are checked by it for images no label row names (data.collect).
# Every one is a format PIL opens (tests/test_images.py checks it against PIL's registry).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".dib", ".tif", ".tiff", ".webp",
                              ".gif", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".jp2", ".j2k"})


class ImageDecodeError(ValueError):
  """An image file that cannot be decoded; `name` is the file, `reason` what went wrong."""

  def __init__(self, name: str, reason: str):
    self.name = name
    self.reason = reason
    super().__init__(f"{name}: cannot decode image: {reason}")


def detected_type(data: bytes) -> str:
  """What a file's bytes look like, by their magic numbers (puremagic), for a message: never any of the content.

  A file named in someone else's label file may hold anything; an error that quoted its first bytes would print a
  secret it was pointed at.
  """
  import puremagic  # pylint: disable=g-import-not-at-top  (only on this error path)
  try:
    match = puremagic.magic_string(data)[0]
    return f"detected type: {match.name} ({match.mime_type or match.extension})"
  except (puremagic.PureError, IndexError, ValueError):
    pass
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError:
    return "detected type: unknown binary data"
  printable = all(c.isprintable() or c.isspace() for c in text)
  return "detected type: text" if printable else "detected type: unknown binary data"


class LimitError(ValueError):
  """An image refused by a limit its caller set, which the caller may raise: too many pixels (`max_pixels`) or
  too small for the short side asked (`max_upscale`).

  `str(e)` advises the Python argument ("pass max_upscale=None to allow it"); a command line words the same facts
  with its own flags: `e.explain(f"--{e.option} {e.limit}", "...")`.

  Attributes:
    name: the file (None for an array).
    width, height: the image's size (after the EXIF orientation), before any resize.
    option: the argument that set the limit: "max_pixels" or "max_upscale".
    limit: its value.
    needed: the smallest value of `option` that allows this image (pixels, or the upscale factor).
    facts: what was refused, without the limit or advice (e.g. "a 20x12 image would be upscaled 4.00x to a short
      side of 48").
  """

  def __init__(self, name: str | None, width: int, height: int, option: str, limit: float, needed: float,
               facts: str, advice: str):
    self.name, self.width, self.height = name, width, height
    self.option, self.limit, self.needed, self.facts = option, limit, needed, facts
    super().__init__(self.explain(f"{option}={limit}", advice))

  def explain(self, limit: str, advice: str) -> str:
    """The message with the limit spelled `limit` (e.g. "--max_upscale 2.0") and `advice` (how to allow it)."""
    return f"{self.name + ': ' if self.name else ''}{self.facts}, more than {limit} ({advice})"


def _too_many_pixels(name: str | None, width: int, height: int, pixels: int, max_pixels: int,
                     facts: str) -> LimitError:
  return LimitError(name, width, height, "max_pixels", max_pixels, pixels, facts,
                    f"a guard against decompression bombs; pass max_pixels={pixels} or more to allow it")


def _too_small(name: str | None, width: int, height: int, factor: float, short_side: int,
               max_upscale: float) -> LimitError:
  return LimitError(name, width, height, "max_upscale", max_upscale, factor,
                    f"a {width}x{height} image would be upscaled {factor:.2f}x to a short side of {short_side}",
                    "pass max_upscale=None to allow it")


def decode(data: bytes, name: str = "<bytes>", *, short_side: int | None = None,
           max_upscale: float | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
           alpha: str = "white", exif_transpose: bool = True) -> np.ndarray:
  """Decodes an encoded image (JPEG, PNG, TIFF, BMP, WebP, GIF, ... whatever PIL reads) to 8-bit RGB.

  With `short_side`, the image comes back resized so its short side is `short_side` (aspect kept, the long side
  `int(short_side * long / short)`, as `resize_short_side`). A JPEG at least `DRAFT_MIN_FACTOR` times larger
  than that is decoded at a reduced DCT scale (PIL's `draft`: 1/2, 1/4 or 1/8, never below the target) and then
  resized with PIL's `reducing_gap`, so the full-size image is never built; other formats and smaller images are
  decoded whole and resized bicubic (`resize_short_side`). Both paths give the same shape; the reduced one is
  within a fraction of a grey level (mean) of the full one on photos (BENCHMARKS.md has the measurement).

  Args:
    data: the file's bytes.
    name: the file's name, used in errors and warnings.
    short_side: resize to this short side (None: the decoded size).
    max_upscale: with short_side, refuse an image that would be enlarged by more than this (None: any).
    max_pixels: refuse images with more pixels than this before decoding them; it replaces PIL's own guard
      (`PIL.Image.MAX_IMAGE_PIXELS`) for this call, so a larger value allows larger images (None: PIL's guard).
    alpha: "white" composites transparent images on white, "drop" discards the alpha channel.
    exif_transpose: apply the EXIF orientation tag.

  Returns:
    uint8 [height, width, 3], height and width after the EXIF orientation (and the resize).

  Raises:
    ImageDecodeError: empty, truncated or unidentifiable data, or a pixel format with no defined 8-bit RGB meaning.
    LimitError: more than `max_pixels` pixels, or an upscale to `short_side` larger than `max_upscale`.
  """
  return _decode(data, name, short_side=short_side, max_upscale=max_upscale, max_pixels=max_pixels, alpha=alpha,
                 exif_transpose=exif_transpose)[0]


def _decode(data: bytes, name: str, *, short_side: int | None, max_upscale: float | None, max_pixels: int | None,
            alpha: str, exif_transpose: bool) -> tuple[np.ndarray, tuple[int, int]]:
  """`decode`, and the image's (height, width) after the EXIF orientation and before any resize."""
  if alpha not in ALPHA_MODES:
    raise ValueError(f"alpha must be one of {ALPHA_MODES}, got {alpha!r}")
  if not data:
    raise ImageDecodeError(name, "the file is empty (0 bytes)")
  try:
    img = _open(data, max_pixels)
  except Image.UnidentifiedImageError:
    raise ImageDecodeError(name, f"not an image format PIL can read ({len(data)} bytes, {detected_type(data)})"
                           ) from None
  except Image.DecompressionBombError as e:  # max_pixels=None: Image.open's guard; else the reader's own (WebP)
    raise _pil_guard(name, e, max_pixels) from e
  except MemoryError:
    raise
  except Exception as e:  # PIL raises many types for malformed headers
    raise ImageDecodeError(name, f"{type(e).__name__}: {e}") from e
  with img:
    width, height = img.size
    # The size after the EXIF orientation (a 90-degree turn swaps the sides).
    turned = exif_transpose and _orientation(img) in (5, 6, 7, 8)
    out_h, out_w = (width, height) if turned else (height, width)
    if max_pixels is not None and width * height > max_pixels:
      raise _too_many_pixels(name, out_w, out_h, width * height, max_pixels,
                             f"{out_w}x{out_h} = {width * height} pixels")
    target, drafted = None, False
    if short_side is not None:
      target = _resize_target(out_h, out_w, short_side, name, max_upscale, max_pixels)
      # MPO: a JPEG with more pictures after the first (many cameras), read by PIL's JPEG reader.
      if img.format in ("JPEG", "MPO") and min(out_h, out_w) >= DRAFT_MIN_FACTOR * short_side:
        # The largest DCT reduction that keeps both sides >= short_side.
        drafted = img.draft(None, (short_side, short_side)) is not None
    try:
      img.load()
    except Image.DecompressionBombError as e:  # a reader that checks again while loading (TIFF)
      raise _pil_guard(name, e, max_pixels) from e
    except MemoryError:
      raise
    except Exception as e:  # truncated or corrupt data: OSError, SyntaxError, zlib.error, ...
      raise ImageDecodeError(name, f"{type(e).__name__}: {e}") from e
    if exif_transpose:
      img = _exif_transpose(img, name)
    rgb = _to_rgb8(img, name, alpha)
  size = (out_h, out_w)
  if target is None or rgb.shape[:2] == target:
    return rgb, size
  if drafted:
    return np.array(Image.fromarray(rgb).resize((target[1], target[0]), resample=BICUBIC,
                                                reducing_gap=REDUCING_GAP)), size
  return resize(rgb, *target), size


def _open(data: bytes, max_pixels: int | None) -> Image.Image:
  """`Image.open` of the bytes; with `max_pixels`, without the decompression-bomb check that `max_pixels` replaces.

  `Image.open` checks the header's size against the global `PIL.Image.MAX_IMAGE_PIXELS` (warning above it, error
  above twice it) before a JPEG's `draft` can reduce the decode. Setting that global, even for a moment, would
  lift the guard for every thread; instead the file is opened the way `Image.open` does, through PIL's registry of
  format readers (the common ones first, then all) less that check, and the caller checks the size against its own
  limit. The readers that check again themselves (WebP, TIFF, GIF frames after the first) keep PIL's error limit,
  twice `PIL.Image.MAX_IMAGE_PIXELS` (~179 MP).
  """
  if max_pixels is None:
    return Image.open(io.BytesIO(data))
  fp, prefix, tried = io.BytesIO(data), data[:16], set()
  for register in (Image.preinit, Image.init):
    register()
    for fmt in [f for f in Image.ID if f not in tried]:
      tried.add(fmt)
      factory, accept = Image.OPEN[fmt]
      accepted = accept is None or accept(prefix)
      if not accepted or isinstance(accepted, str):  # a string: PIL knows the format but cannot read it
        continue
      fp.seek(0)
      try:
        return factory(fp, "")
      except (SyntaxError, IndexError, TypeError, struct.error):  # not this format after all (as Image.open)
        continue
  raise Image.UnidentifiedImageError("cannot identify image file")


def _pil_guard(name: str, e: Image.DecompressionBombError, max_pixels: int | None) -> ImageDecodeError:
  if max_pixels is None:
    return ImageDecodeError(name, f"{e} (PIL's guard; pass max_pixels to set the limit for this call)")
  return ImageDecodeError(name, f"{e} (PIL's reader of this format applies PIL's own guard, "
                          "PIL.Image.MAX_IMAGE_PIXELS, whatever max_pixels is)")


def _resize_target(height: int, width: int, short_side: int, name: str | None, max_upscale: float | None,
                   max_pixels: int | None) -> tuple[int, int]:
  """The (height, width) of a short-side resize, refusing a too large upscale or too many resulting pixels."""
  factor = short_side / min(height, width)
  if max_upscale is not None and factor > max_upscale:
    raise _too_small(name, width, height, factor, short_side, max_upscale)
  new_h, new_w = short_side_size(height, width, short_side)
  if max_pixels is not None and new_h * new_w > max_pixels:
    raise _too_many_pixels(name, width, height, new_h * new_w, max_pixels,
                           f"a {width}x{height} image resized to a short side of {short_side} would be "
                           f"{new_w}x{new_h} = {new_h * new_w} pixels (aspect ratio too extreme)")
  return new_h, new_w


def _orientation(img: Image.Image) -> int:
  try:
    return int(img.getexif().get(0x0112, 1))
  except Exception:  # pylint: disable=broad-except  (unreadable EXIF: _exif_transpose warns about it)
    return 1


def load(path: str | os.PathLike[str], **kwargs) -> np.ndarray:
  """Reads and decodes an image file; keyword arguments as `decode` (e.g. `short_side=512`). Returns uint8
  [height, width, 3]."""
  with open(path, "rb") as f:
    data = f.read()
  return decode(data, os.fspath(path), **kwargs)


def _exif_transpose(img: Image.Image, name: str) -> Image.Image:
  try:
    return ImageOps.exif_transpose(img)
  except MemoryError:
    raise
  except Exception as e:  # corrupt EXIF should not make the pixels unusable
    warnings.warn(f"{name}: EXIF orientation ignored, the EXIF data is unreadable ({type(e).__name__}: {e})",
                  stacklevel=3)
    return img


def _to_rgb8(img: Image.Image, name: str, alpha: str) -> np.ndarray:
  """PIL image of any mode -> uint8 [height, width, 3]."""
  mode = img.mode
  if mode == "RGB":
    return np.array(img)
  if mode in ("1", "L"):
    return _grey_to_rgb(np.array(img.convert("L")))
  if mode == "P":
    has_alpha = "transparency" in img.info
    return _to_rgb8(img.convert("RGBA" if has_alpha else "RGB"), name, alpha)
  if mode in ("LA", "La", "PA", "RGBa"):
    return _to_rgb8(img.convert("RGBA"), name, alpha)
  if mode == "RGBA":
    rgba = np.array(img)
    if alpha == "drop":
      return np.ascontiguousarray(rgba[..., :3])
    return _composite_on_white(rgba[..., :3], rgba[..., 3:])
  if mode.startswith("I;16"):
    return _grey_to_rgb(_scale_16bit(np.array(img)))
  if mode == "I":
    values = np.array(img)
    if values.size and (values.min() < 0 or values.max() > 65535):
      raise ImageDecodeError(name, f"32-bit integer pixels in [{values.min()}, {values.max()}]: only 0..65535 "
                             "(16-bit) data has a defined 8-bit scaling")
    return _grey_to_rgb(_scale_16bit(values))
  if mode == "F":
    values = np.array(img, dtype=np.float64)
    if not np.isfinite(values).all():
      raise ImageDecodeError(name, "float image with NaN or infinite pixels")
    low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
    if low < 0 or high > 255:
      raise ImageDecodeError(name, f"float pixels in [{low}, {high}]: expected [0, 1] or [0, 255]")
    scale = 255.0 if high <= 1.0 else 1.0
    return _grey_to_rgb(np.round(values * scale).astype(np.uint8))
  try:
    return np.array(img.convert("RGB"))
  except ValueError as e:
    raise ImageDecodeError(name, f"PIL mode {mode!r} has no conversion to RGB ({e})") from e


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
  return np.repeat(grey[..., None], 3, axis=-1)


def _scale_16bit(values: np.ndarray) -> np.ndarray:
  return np.round(values.astype(np.float64) / 257.0).astype(np.uint8)


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
  """rgb * a + 255 * (1 - a), a = alpha / 255, rounded; uint8 [..., 3]."""
  a = alpha.astype(np.uint32)
  return (255 - ((255 - rgb.astype(np.uint32)) * a + 127) // 255).astype(np.uint8)


def _check_rgb8(img: np.ndarray) -> None:
  if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
    raise ValueError(f"expected a uint8 [height, width, 3] image, got {img.dtype} {list(img.shape)}")


def resize(img: np.ndarray, height: int, width: int, *, resample: int = BICUBIC) -> np.ndarray:
  """PIL resize of uint8 [h, w, 3] to uint8 [height, width, 3] (bicubic by default, as CLIP)."""
  _check_rgb8(img)
  if height < 1 or width < 1:
    raise ValueError(f"resize target must be at least 1x1, got {height}x{width}")
  if img.shape[:2] == (height, width):
    return img
  return np.array(Image.fromarray(img).resize((width, height), resample=resample))


_resize_image = resize  # for `eval_crops`, whose argument `resize` is the short side


def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
  """(height, width) with the short side equal to `size` and the long side `int(size * long / short)`."""
  if height <= width:
    return size, int(size * width / height)
  return int(size * height / width), size


def resize_short_side(img: np.ndarray, size: int, *, max_upscale: float | None = 2.0,
                      resample: int = BICUBIC) -> np.ndarray:
  """Resizes so the short side is `size`, keeping the aspect ratio.

  Args:
    img: uint8 [h, w, 3].
    size: target short side.
    max_upscale: refuse to enlarge by more than this factor (an image that small would be scored on
      interpolated pixels); None allows any factor.
    resample: PIL filter.

  Returns:
    uint8 [new_h, new_w, 3], `img` itself when its short side is already `size`.

  Raises:
    LimitError: the upscale factor `size / short side` is above `max_upscale`.
  """
  _check_rgb8(img)
  h, w = img.shape[:2]
  factor = size / min(h, w)
  if max_upscale is not None and factor > max_upscale:
    raise _too_small(None, w, h, factor, size, max_upscale)
  return resize(img, *short_side_size(h, w, size), resample=resample)


def ensure_min_side(img: np.ndarray, size: int, *, resample: int = BICUBIC) -> np.ndarray:
  """Resizes uint8 [h, w, 3] up so its short side is at least `size` (for crops); larger images are returned."""
  _check_rgb8(img)
  if min(img.shape[:2]) >= size:
    return img
  return resize_short_side(img, size, max_upscale=None, resample=resample)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(size, (int, np.integer)):
    return int(size), int(size)
  h, w = size
  return int(h), int(w)


def crop(img: np.ndarray, top: int, left: int, size: int | Sequence[int]) -> np.ndarray:
  """The window `[top:top + h, left:left + w]` of `[..., height, width, channels]` (a view).

  Args:
    img: [..., height, width, channels] array.
    top, left: the window's first row and column.
    size: crop side, or (h, w).

  Raises:
    ValueError: the window is not inside the image.
  """
  h, w = _pair(size)
  height, width = img.shape[-3:-1]
  if top < 0 or left < 0 or top + h > height or left + w > width:
    raise ValueError(f"crop {h}x{w} at (top={top}, left={left}) is outside the {height}x{width} image")
  return img[..., top:top + h, left:left + w, :]


def center_crop_position(height: int, width: int, size: int | Sequence[int]) -> tuple[int, int]:
  """(top, left) of the centre crop, rounding down as transformers' CLIP image processor does."""
  h, w = _pair(size)
  return (height - h) // 2, (width - w) // 2


def _grid_shape(num_crops: int, height: int, width: int) -> tuple[int, int]:
  """(rows, cols) with rows * cols == num_crops whose aspect rows / cols is nearest the image's (fewer rows on
  ties)."""
  pairs = [(r, num_crops // r) for r in range(1, num_crops + 1) if num_crops % r == 0]
  target = math.log(height / width)
  return min(pairs, key=lambda rc: (abs(math.log(rc[0] / rc[1]) - target), rc[0]))


def _axis_positions(length: int, size: int, count: int) -> list[int]:
  """`count` starts from 0 to `length - size`, evenly spaced and rounded half up; the centre for one."""
  free = length - size
  if count == 1:
    return [free // 2]
  return [(2 * i * free + count - 1) // (2 * (count - 1)) for i in range(count)]


def grid_crop_positions(height: int, width: int, size: int | Sequence[int], num_crops: int
                        ) -> list[tuple[int, int]]:
  """(top, left) of `num_crops` crops on a regular grid over the image, row by row.

  The grid has rows * cols == num_crops, shaped like the image (15 crops: 3 rows x 5 columns on a landscape
  image, 5 x 3 on a portrait one; a prime count gives one row or column). Along each axis the first crop
  touches the first edge and the last the far edge, evenly spaced between, so the crops cover the image
  whenever the spacing is at most the crop size. One crop is the centre crop (`center_crop_position`).

  Raises:
    ValueError: the crop is larger than the image (resize first, e.g. `ensure_min_side`) or num_crops < 1.
  """
  h, w = _pair(size)
  if num_crops < 1:
    raise ValueError(f"num_crops must be at least 1, got {num_crops}")
  if h > height or w > width:
    raise ValueError(f"a {h}x{w} crop does not fit in a {height}x{width} image (resize it first, e.g. with "
                     "ensure_min_side)")
  rows, cols = _grid_shape(num_crops, height, width)
  tops = _axis_positions(height, h, rows)
  lefts = _axis_positions(width, w, cols)
  return [(t, l) for t in tops for l in lefts]


# Upscaling beyond this factor is reported (`eval_crops` returns the factor; the Scorer notes it per image).
NOTE_UPSCALE = 2.0
# The evaluation protocol's upscale limit, the same for eval.py's pipeline and a trained model's Scorer: an image
# needing more than this to reach the protocol's short side is refused, naming the file.
DEFAULT_MAX_UPSCALE = 2.0


def eval_crops(image: bytes | np.ndarray, name: str, *, resize: int, image_size: int, num_crops: int,
               max_upscale: float | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS
               ) -> tuple[np.ndarray, tuple[int, int]]:
  """The evaluation protocol, used by eval.py's pipeline and by the Scorer alike: the image resized so its short
  side is `resize` (`decode(short_side=...)` for encoded bytes), then `num_crops` crops of `image_size` on the grid
  of `grid_crop_positions`.

  Upscale policy (one for both): an image that needs more than `max_upscale` to reach `resize` is refused with an
  error naming it (None: any factor); the factor is `resize / min(height, width)` of the returned size, and the
  Scorer notes it on the result past NOTE_UPSCALE.

  Args:
    image: the encoded file's bytes, or a decoded uint8 [h, w, 3] RGB array.
    name: the file's name, for errors.
    max_pixels: as `decode` (for an array: the pixels after the resize only).

  Returns:
    (uint8 [num_crops, image_size, image_size, 3], (height, width) of the image before the resize).
  """
  if resize < image_size:
    raise ValueError(f"resize ({resize}) must be at least the crop size ({image_size})")
  if num_crops < 1:
    raise ValueError(f"num_crops must be at least 1, got {num_crops}")
  if isinstance(image, np.ndarray):
    _check_rgb8(image)
    size = image.shape[:2]
    img = _resize_image(image, *_resize_target(size[0], size[1], resize, name, max_upscale, max_pixels))
  else:
    img, size = _decode(image, name, short_side=resize, max_upscale=max_upscale, max_pixels=max_pixels,
                        alpha="white", exif_transpose=True)
  positions = grid_crop_positions(img.shape[0], img.shape[1], image_size, num_crops)
  return np.stack([crop(img, top, left, image_size) for top, left in positions]), (int(size[0]), int(size[1]))

