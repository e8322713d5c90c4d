"""mcpf_jax.images: decoding every odd kind of image file PIL reads, and the crop geometry."""

import io
import pathlib
import struct
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageDraw, ImageFile

from mcpf_jax import images

REPO = pathlib.Path(__file__).resolve().parents[1]


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
  buf = io.BytesIO()
  img.save(buf, fmt, **kwargs)
  return buf.getvalue()


def png_16bit(values: np.ndarray) -> bytes:
  """A 16-bit PNG written by hand (PIL cannot write 16-bit colour): grey [h, w] or RGB [h, w, 3]."""
  h, w = values.shape[:2]
  color_type = 0 if values.ndim == 2 else 2
  raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))  # filter 0 per row

  def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

  header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) +
          chunk(b"IEND", b""))


def random_rgb(h=24, w=32, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_rgb_png_roundtrip_and_load(tmp_path):
  rgb = random_rgb()
  path = tmp_path / "x.png"
  path.write_bytes(encode(Image.fromarray(rgb), "PNG"))
  out = images.load(path)
  assert out.dtype == np.uint8 and out.shape == (24, 32, 3)
  np.testing.assert_array_equal(out, rgb)


def test_grey_and_bilevel():
  grey = random_rgb()[..., 0]
  out = images.decode(encode(Image.fromarray(grey, "L"), "PNG"))
  np.testing.assert_array_equal(out, np.stack([grey] * 3, -1))
  bits = grey > 127
  out = images.decode(encode(Image.fromarray(bits).convert("1"), "PNG"))
  np.testing.assert_array_equal(out, np.stack([bits * 255] * 3, -1).astype(np.uint8))


def test_palette_with_and_without_transparency():
  index = np.array([[0, 1], [2, 1]], np.uint8)
  palette = [200, 10, 20, 30, 220, 40, 50, 60, 250]
  img = Image.fromarray(index, "P")
  img.putpalette(palette)
  colours = np.array(palette, np.uint8).reshape(3, 3)
  np.testing.assert_array_equal(images.decode(encode(img, "PNG")), colours[index])
  data = encode(img, "PNG", transparency=1)  # index 1 fully transparent
  assert Image.open(io.BytesIO(data)).info["transparency"] == 1
  expected = colours[index]
  expected[index == 1] = 255
  np.testing.assert_array_equal(images.decode(data), expected)
  np.testing.assert_array_equal(images.decode(data, alpha="drop"), colours[index])


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_composited_on_white_or_dropped(mode):
  rng = np.random.default_rng(1)
  channels = 4 if mode == "RGBA" else 2
  pixels = rng.integers(0, 256, (16, 16, channels), dtype=np.uint8)
  pixels[0, 0, -1], pixels[0, 1, -1] = 0, 255
  out = images.decode(encode(Image.fromarray(pixels, mode), "PNG"))
  colour = pixels[..., :-1].astype(np.float64)
  a = pixels[..., -1:].astype(np.float64) / 255
  expected = np.broadcast_to(np.round(colour * a + 255 * (1 - a)), (16, 16, 3))
  np.testing.assert_allclose(out, expected, atol=0.5)  # exact up to rounding of .5 cases
  assert (out[0, 0] == 255).all() and (out[0, 1] == pixels[0, 1, :-1]).all()
  np.testing.assert_array_equal(images.decode(encode(Image.fromarray(pixels, mode), "PNG"), alpha="drop"),
                                np.broadcast_to(pixels[..., :-1], (16, 16, 3)))
  with pytest.raises(ValueError, match="alpha"):
    images.decode(encode(Image.fromarray(pixels, mode), "PNG"), alpha="black")


def test_cmyk_jpeg_with_adobe_inversion():
  blocks = [((255, 0, 0, 0), (0, 255, 255)), ((0, 255, 0, 0), (255, 0, 255)), ((0, 0, 255, 0), (255, 255, 0)),
            ((0, 0, 0, 0), (255, 255, 255)), ((0, 0, 0, 255), (0, 0, 0))]
  img = Image.new("CMYK", (16 * len(blocks), 16))
  for i, (cmyk, _) in enumerate(blocks):
    img.paste(cmyk, (16 * i, 0, 16 * i + 16, 16))
  data = encode(img, "JPEG", quality=100)
  assert "adobe" in Image.open(io.BytesIO(data)).info  # libjpeg stores CMYK inverted behind an Adobe marker
  out = images.decode(data)
  for i, (_, rgb) in enumerate(blocks):
    np.testing.assert_allclose(out[4:12, 16 * i + 4:16 * i + 12], np.broadcast_to(rgb, (8, 8, 3)), atol=4)


def test_16bit_grey_png_is_scaled_not_clipped():
  values = np.array([[0, 128, 129, 1000], [32767, 32896, 65279, 65535]], np.uint16)
  data = encode(Image.fromarray(values), "PNG")
  assert Image.open(io.BytesIO(data)).mode == "I;16"
  expected = np.floor(values / 257 + 0.5).astype(np.uint8)
  assert expected.tolist() == [[0, 0, 1, 4], [127, 128, 254, 255]]
  np.testing.assert_array_equal(images.decode(data), np.stack([expected] * 3, -1))
  np.testing.assert_array_equal(images.decode(png_16bit(values)), np.stack([expected] * 3, -1))


def test_16bit_rgb_png_and_tiff_within_one_level():
  values = np.random.default_rng(2).integers(0, 65536, (8, 12, 3)).astype(np.uint16)
  values[0, 0] = [0, 65535, 32768]
  expected = values / 257
  out = images.decode(png_16bit(values), "rgb16.png")
  np.testing.assert_allclose(out, expected, atol=1.0)
  assert out[0, 0].tolist() == [0, 255, 128]
  buf = io.BytesIO()
  tifffile.imwrite(buf, values, photometric="rgb")
  np.testing.assert_allclose(images.decode(buf.getvalue(), "rgb16.tif"), expected, atol=1.0)


def test_32bit_integer_and_float_tiff():
  values = np.array([[0, 257, 65535], [1000, 2, 40000]], np.int32)
  buf = io.BytesIO()
  tifffile.imwrite(buf, values)
  assert Image.open(io.BytesIO(buf.getvalue())).mode == "I"
  np.testing.assert_array_equal(images.decode(buf.getvalue())[..., 0], np.floor(values / 257 + 0.5))
  buf = io.BytesIO()
  tifffile.imwrite(buf, np.array([[-5, 0]], np.int16))
  with pytest.raises(images.ImageDecodeError, match="signed.tif.*0..65535"):
    images.decode(buf.getvalue(), "signed.tif")
  unit = np.array([[0.0, 0.25, 1.0]], np.float32)
  buf = io.BytesIO()
  tifffile.imwrite(buf, unit)
  assert Image.open(io.BytesIO(buf.getvalue())).mode == "F"
  assert images.decode(buf.getvalue())[0, :, 1].tolist() == [0, 64, 255]
  buf = io.BytesIO()
  tifffile.imwrite(buf, np.array([[0.0, 300.0]], np.float32))
  with pytest.raises(images.ImageDecodeError, match="float"):
    images.decode(buf.getvalue())


@pytest.mark.parametrize("orientation,corner", [(1, (0, 0)), (6, (0, -1)), (8, (-1, 0)), (3, (-1, -1))])
def test_exif_orientation(orientation, corner):
  stored = np.zeros((40, 64, 3), np.uint8)
  stored[:10, :10] = [255, 0, 0]  # a red mark at the stored top-left
  exif = Image.Exif()
  exif[0x0112] = orientation
  data = encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())
  out = images.decode(data)
  assert out.shape == ((64, 40, 3) if orientation in (6, 8) else (40, 64, 3))
  h, w = out.shape[:2]
  rows = slice(0, 10) if corner[0] == 0 else slice(h - 10, h)
  cols = slice(0, 10) if corner[1] == 0 else slice(w - 10, w)
  mark = out[rows, cols][2:-2, 2:-2]  # the displayed corner the mark must be in, minus JPEG ringing
  assert mark[..., 0].min() > 200 and mark[..., 1:].max() < 60
  assert out[h // 2, w // 2].max() < 30
  unrotated = images.decode(data, exif_transpose=False)
  assert unrotated.shape == (40, 64, 3)


def test_truncated_empty_and_non_image_files_name_the_file(tmp_path):
  jpeg = encode(Image.fromarray(random_rgb(64, 64)), "JPEG")
  with pytest.raises(images.ImageDecodeError, match=r"cut\.jpg.*truncated") as e:
    images.decode(jpeg[:len(jpeg) // 2], "cut.jpg")
  assert isinstance(e.value, ValueError) and e.value.name == "cut.jpg"
  png = encode(Image.fromarray(random_rgb(64, 64)), "PNG")
  with pytest.raises(images.ImageDecodeError, match=r"cut\.png"):
    images.decode(png[:len(png) // 2], "cut.png")
  empty = tmp_path / "empty.png"
  empty.write_bytes(b"")
  with pytest.raises(images.ImageDecodeError, match=r"empty\.png.*empty"):
    images.load(empty)
  text = tmp_path / "notes.jpg"
  text.write_text("this is not a picture\n")
  with pytest.raises(images.ImageDecodeError, match=r"notes\.jpg.*not an image") as e:
    images.load(text)
  assert e.value.name == str(text)
  assert not ImageFile.LOAD_TRUNCATED_IMAGES


def test_pixel_limit():
  data = encode(Image.fromarray(random_rgb(30, 40)), "PNG")
  with pytest.raises(images.LimitError) as e:
    images.decode(data, "big.png", max_pixels=1000)
  assert str(e.value) == ("big.png: 40x30 = 1200 pixels, more than max_pixels=1000 (a guard against decompression "
                          "bombs; pass max_pixels=1200 or more to allow it)")
  assert (e.value.name, e.value.width, e.value.height) == ("big.png", 40, 30)
  assert (e.value.option, e.value.limit, e.value.needed) == ("max_pixels", 1000, 1200)
  assert e.value.explain("--max_pixels 1000", "ok") == "big.png: 40x30 = 1200 pixels, more than --max_pixels 1000 (ok)"
  assert images.decode(data, max_pixels=1200).shape == (30, 40, 3)
  assert images.decode(data, max_pixels=None).shape == (30, 40, 3)
  # The size reported is the one shown, after the EXIF orientation (here a quarter turn: 30x40).
  exif = Image.Exif()
  exif[0x0112] = 6
  turned = encode(Image.fromarray(random_rgb(30, 40)), "JPEG", exif=exif.tobytes())
  with pytest.raises(images.LimitError, match="30x40 = 1200 pixels") as e:
    images.decode(turned, max_pixels=1000)
  assert (e.value.width, e.value.height) == (30, 40)


def test_max_pixels_replaces_pils_guard_for_the_call_only(monkeypatch):
  """PIL's guard is a global (`Image.MAX_IMAGE_PIXELS`): lowered here so a small image is a 'bomb' to PIL."""
  rgb = random_rgb(30, 40)
  data = encode(Image.fromarray(rgb), "PNG")
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # PIL warns above 500 pixels and refuses above 1000
  with pytest.raises(images.ImageDecodeError, match=r"x\.png.*exceeds limit of 1000 pixels.*pass max_pixels"):
    images.decode(data, "x.png", max_pixels=None)  # None: PIL's own guard
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # not even PIL's DecompressionBombWarning: max_pixels is the guard now
    np.testing.assert_array_equal(images.decode(data, max_pixels=1200), rgb)
  assert Image.MAX_IMAGE_PIXELS == 500  # the global is never changed, not even for a moment...
  with pytest.raises(Image.DecompressionBombError):  # ...so other code keeps PIL's guard
    Image.open(io.BytesIO(data))
  with pytest.raises(images.LimitError, match="max_pixels=1199"):
    images.decode(data, max_pixels=1199)
  # Every format opens this way, as Image.open opens it, and what is not an image is still refused.
  for fmt in ("JPEG", "PNG", "BMP", "GIF", "PPM", "JPEG2000"):
    np.testing.assert_array_equal(images.decode(encode(Image.fromarray(rgb), fmt), max_pixels=1200).shape, rgb.shape)
  for fmt in ("TIFF", "WEBP"):  # readers that apply PIL's guard again themselves: said so
    with pytest.raises(images.ImageDecodeError, match="applies PIL's own guard.*whatever max_pixels is"):
      images.decode(encode(Image.fromarray(rgb), fmt), max_pixels=1200)
  with pytest.raises(images.ImageDecodeError, match="not an image format"):
    images.decode(b"this is not a picture", max_pixels=1200)


def test_mpo_camera_jpeg_is_read_at_a_reduced_scale():
  """Many cameras write MPO (a JPEG followed by more pictures): PIL's JPEG reader, so the reduced decode too."""
  img = Image.fromarray(random_rgb(6, 9)).resize((900, 600), Image.Resampling.BILINEAR)
  mpo = encode(img, "MPO", save_all=True, append_images=[img.resize((90, 60))], quality=90)
  assert Image.open(io.BytesIO(mpo)).format == "MPO"
  reduced = images.decode(mpo, short_side=100)
  np.testing.assert_array_equal(reduced, images.decode(encode(img, "JPEG", quality=90), short_side=100))
  assert not np.array_equal(reduced, images.resize_short_side(images.decode(mpo), 100))  # not the full decode


_PEAK_DECODE = """
import resource, sys
from mcpf_jax import images
img = images.load(sys.argv[1], short_side=512, max_pixels=int(sys.argv[2]))
print(img.shape[0], img.shape[1], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _peak_decode(path, max_pixels: int) -> tuple[tuple[int, int], int]:
  """(height, width) and the peak resident memory in bytes of a fresh process decoding `path` to a short side
  of 512 (as scoring does)."""
  proc = subprocess.run([sys.executable, "-c", _PEAK_DECODE, str(path), str(max_pixels)], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  h, w, kib = proc.stdout.split()
  return (int(h), int(w)), int(kib) * 1024  # ru_maxrss is in KiB on Linux


def _striped_jpeg(path, width: int, height: int) -> None:
  """A JPEG of vertical stripes (it compresses to a few MB even at 200 MP)."""
  img = Image.new("RGB", (width, height), (90, 140, 200))
  draw = ImageDraw.Draw(img)
  for x in range(0, width, 1000):
    draw.rectangle([x, 0, x + 400, height], fill=(200, 60, 30))
  img.save(path, quality=80)


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss units (KiB) are Linux's")
def test_a_200_megapixel_jpeg_decodes_in_the_memory_of_a_12_megapixel_one(tmp_path):
  _striped_jpeg(tmp_path / "12mp.jpg", 4000, 3000)
  _striped_jpeg(tmp_path / "200mp.jpg", 17000, 12000)
  with pytest.raises(images.LimitError, match=r"17000x12000 = 204000000 pixels.*max_pixels=204000000 or more"):
    images.load(tmp_path / "200mp.jpg", short_side=512)
  shape, small = _peak_decode(tmp_path / "12mp.jpg", images.DEFAULT_MAX_PIXELS)
  assert shape == (512, 682)
  shape, big = _peak_decode(tmp_path / "200mp.jpg", 204_000_000)
  assert shape == (512, 725)
  full = 17000 * 12000 * 3  # the decoded image at full size
  assert big - small < full / 6, f"peak {big / 2**20:.0f} MiB for 200 MP, {small / 2**20:.0f} MiB for 12 MP"


def test_resize_short_side_and_upscale_limit():
  img = random_rgb(30, 45)
  out = images.resize_short_side(img, 20)
  assert out.shape == (20, 30, 3)
  np.testing.assert_array_equal(out, np.asarray(Image.fromarray(img).resize((30, 20), Image.BICUBIC)))
  assert images.resize_short_side(random_rgb(45, 31), 20).shape == (29, 20, 3)  # int(20 * 45 / 31) = 29
  assert images.resize_short_side(img, 60).shape == (60, 90, 3)  # exactly 2x is allowed
  with pytest.raises(images.LimitError) as e:
    images.resize_short_side(img, 61)
  assert str(e.value) == ("a 45x30 image would be upscaled 2.03x to a short side of 61, more than max_upscale=2.0 "
                          "(pass max_upscale=None to allow it)")
  assert (e.value.option, e.value.limit, e.value.width, e.value.height) == ("max_upscale", 2.0, 45, 30)
  assert e.value.needed == pytest.approx(61 / 30)
  assert images.resize_short_side(img, 90, max_upscale=None).shape == (90, 135, 3)
  assert images.resize_short_side(img, 30) is img
  with pytest.raises(ValueError, match="uint8"):
    images.resize_short_side(img.astype(np.float32), 20)


def test_ensure_min_side():
  small = random_rgb(10, 50)
  assert images.ensure_min_side(small, 32).shape == (32, 160, 3)
  big = random_rgb(40, 50)
  assert images.ensure_min_side(big, 32) is big


def test_crop_bounds_and_batch_dims():
  img = random_rgb(20, 30)
  np.testing.assert_array_equal(images.crop(img, 5, 7, 10), img[5:15, 7:17])
  np.testing.assert_array_equal(images.crop(img, 0, 0, (20, 30)), img)
  batch = np.stack([img, img[::-1]])
  assert images.crop(batch, 1, 2, (3, 4)).shape == (2, 3, 4, 3)
  with pytest.raises(ValueError, match=r"outside the 20x30 image"):
    images.crop(img, 11, 0, 10)
  with pytest.raises(ValueError, match="outside"):
    images.crop(img, 0, -1, 10)


def test_grid_crop_positions():
  assert images.grid_crop_positions(300, 401, 224, 1) == [images.center_crop_position(300, 401, 224)]
  assert images.center_crop_position(300, 401, 224) == (38, 88)
  # 15 crops on a landscape image: 3 rows x 5 columns touching all four edges.
  positions = images.grid_crop_positions(384, 512, 224, 15)
  assert positions == [(t, l) for t in (0, 80, 160) for l in (0, 72, 144, 216, 288)]
  assert images.grid_crop_positions(384, 512, 224, 15) == positions  # deterministic
  portrait = images.grid_crop_positions(512, 384, 224, 15)
  assert sorted({t for t, _ in portrait}) == [0, 72, 144, 216, 288] and sorted({l for _, l in portrait}) == [0, 80, 160]
  assert len(images.grid_crop_positions(500, 500, 224, 4)) == 4
  assert images.grid_crop_positions(500, 500, 224, 4) == [(0, 0), (0, 276), (276, 0), (276, 276)]
  # Every pixel of the image lies in at least one crop.
  covered = np.zeros((384, 512), bool)
  for t, l in positions:
    covered[t:t + 224, l:l + 224] = True
  assert covered.all()
  # A crop that fills the image is repeated.
  assert images.grid_crop_positions(224, 224, 224, 3) == [(0, 0)] * 3
  with pytest.raises(ValueError, match="ensure_min_side"):
    images.grid_crop_positions(200, 500, 224, 5)
  with pytest.raises(ValueError, match="num_crops"):
    images.grid_crop_positions(300, 300, 224, 0)


def test_image_extensions_are_formats_pil_opens():
  """The one set of image extensions (folders of users' images, a release's unlabelled-image check) is PIL's."""
  registered = Image.registered_extensions()
  assert all(e == e.lower() and e.startswith(".") for e in images.IMAGE_EXTENSIONS)
  unknown = sorted(e for e in images.IMAGE_EXTENSIONS if registered.get(e) not in Image.OPEN)
  assert not unknown, f"PIL cannot open {unknown}"
