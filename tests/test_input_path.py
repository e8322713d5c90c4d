"""One image path for training, evaluation and scoring: reduced-scale JPEG decoding, one evaluation crop function,
pre-resized datasets, and batches prefetched to the devices."""

import io
import pathlib

import jax
import numpy as np
import PIL.Image
import pytest
import skimage.data
import tensorflow_datasets as tfds

from configs import smoke
from mcpf_jax import data, images, scores, scoring
from mcpf_jax.data import pipeline
from mcpf_jax.train import data_setup
from mcpf_jax.train import mesh as mesh_lib


def _jpeg(img: np.ndarray, quality: int = 90, exif: bytes | None = None) -> bytes:
  buf = io.BytesIO()
  kwargs = {"exif": exif} if exif else {}
  PIL.Image.fromarray(img).save(buf, format="JPEG", quality=quality, **kwargs)
  return buf.getvalue()


def _photo(name: str, width: int, height: int) -> np.ndarray:
  """A real photo (scikit-image's) enlarged to a camera's size."""
  return np.array(PIL.Image.fromarray(getattr(skimage.data, name)()).resize((width, height), PIL.Image.BICUBIC))


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
  return _jpeg(_photo("astronaut", 4000, 3000))  # 12 megapixels, as SPAQ's photos


def test_reduced_scale_decode_matches_a_full_decode_and_resize(big_jpeg):
  full = images.resize_short_side(images.decode(big_jpeg), 512)
  fast = images.decode(big_jpeg, "big.jpg", short_side=512)
  assert fast.shape == full.shape == (512, 682, 3)
  mad = np.abs(fast.astype(np.int16) - full).mean()
  assert mad <= 1.0, f"mean absolute difference {mad:.3f} grey levels"
  assert mad > 0  # it is a different (reduced-scale) decode, not the same one


def test_reduced_scale_decode_follows_the_exif_orientation():
  img = _photo("coffee", 3000, 2000)  # landscape as stored
  exif = PIL.Image.Exif()
  exif[0x0112] = 6  # shown turned by 90 degrees: portrait
  data_ = _jpeg(img, exif=exif.tobytes())
  full = images.resize_short_side(images.decode(data_), 300)
  fast = images.decode(data_, short_side=300)
  assert fast.shape == full.shape == (450, 300, 3)
  assert np.abs(fast.astype(np.int16) - full).mean() <= 1.0


def test_small_images_and_other_formats_take_the_plain_path():
  img = _photo("chelsea", 700, 500)
  for encoded in (_jpeg(img), _png(img)):  # too small for a DCT reduction to 300 (< 2x); a PNG
    plain = images.resize_short_side(images.decode(encoded), 300)
    np.testing.assert_array_equal(images.decode(encoded, short_side=300), plain)
  big_png = _png(_photo("chelsea", 1400, 1000))
  np.testing.assert_array_equal(images.decode(big_png, short_side=300),
                                images.resize_short_side(images.decode(big_png), 300))
  with pytest.raises(ValueError, match=r"tiny.jpg: a 700x500 image would be upscaled 2.40x .* max_upscale=2.0"):
    images.decode(_jpeg(img), "tiny.jpg", short_side=1200, max_upscale=2.0)


def _png(img: np.ndarray) -> bytes:
  buf = io.BytesIO()
  PIL.Image.fromarray(img).save(buf, format="PNG")
  return buf.getvalue()


def test_eval_pipeline_and_scorer_make_identical_crops(big_jpeg, test_data, tmp_path):
  folder = test_data / "clive-mini" / "ChallengeDB_release" / "Images"
  files = sorted(folder.glob("*.bmp"))[:2] + sorted(folder.glob("*.JPG"))[:2]
  assert files, "no CLIVE miniature images"
  (tmp_path / "big.jpg").write_bytes(big_jpeg)
  paths = [str(f) for f in files] + [str(tmp_path / "big.jpg")]
  records = [{"image": pathlib.Path(p).read_bytes(), "name": p, "mos": 3.0} for p in paths]
  score_map = scores.ScoreMap.fit([1.0, 5.0], higher_is_better=True)
  protocol = dict(resize=512, image_size=224, num_crops=15)
  batches = list(pipeline.eval_batches(records, range(len(records)), batch_size=len(records), score_map=score_map,
                                       max_upscale=2.0, **protocol))
  prep = scoring.Preprocessing(max_upscale=2.0, **protocol)
  for i, path in enumerate(paths):
    crops, size, _ = prep.crops(pathlib.Path(path).read_bytes(), path)
    assert crops.shape == (15, 224, 224, 3)
    np.testing.assert_array_equal(batches[0]["image"][i], crops, err_msg=path)
    prepared = scoring.scorer._prepare(i, path, prep)  # pylint: disable=protected-access  (the Scorer's own reader)
    assert prepared.error is None and (prepared.height, prepared.width) == size
    np.testing.assert_array_equal(prepared.crops, crops)


def _csv_release(root: pathlib.Path) -> pathlib.Path:
  """A csv dataset of 4 large JPEG photos and 2 small ones."""
  (root / "images").mkdir(parents=True)
  rows = ["path,mos"]
  for i, name in enumerate(["astronaut", "coffee", "chelsea", "rocket", "astronaut", "coffee"]):
    size = (1200, 900) if i < 4 else (300, 200)
    (root / "images" / f"{i}.jpg").write_bytes(_jpeg(_photo(name, *size)))
    rows.append(f"images/{i}.jpg,{1 + 0.5 * i}")
  (root / "mos.csv").write_text("\n".join(rows) + "\n")
  return root


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
  root = tmp_path_factory.mktemp("prepared")
  release = _csv_release(root / "release")
  out = {}
  for resize in (None, 256):
    d = root / f"data_{resize}"
    data.builder("csv", data_dir=d, config=data.CsvConfig(name="photos", csv_path="mos.csv", image_column="path",
                                                          mos_column="mos"), resize=resize).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(release)))
    out[resize] = d
  return out


def test_a_pre_resized_dataset_holds_the_training_pixels_and_records_its_size(builds):
  original = data.source("csv", builds[None], config="photos")
  resized = data.source("csv", builds[256], config="photos")
  assert original.metadata["resize"] is None and resized.metadata["resize"] == 256
  assert resized.metadata["resize_format"] == "png"
  for i in range(len(original)):
    a, b = original[i], resized[i]
    assert a["name"] == b["name"] and a["mos"] == b["mos"]
    small = min(PIL.Image.open(io.BytesIO(a["image"])).size) <= 256
    if small:
      assert b["image"] == a["image"]  # kept as they are; training resizes them as always
    else:
      assert b["image"].startswith(b"\x89PNG") and len(b["image"]) < len(a["image"]) * 4
    np.testing.assert_array_equal(images.decode(b["image"], short_side=256),
                                  images.decode(a["image"], short_side=256, max_upscale=None))
  # The training batches of both builds are the same, pixel for pixel.
  score_map = scores.ScoreMap.fit([1.0, 4.0], higher_is_better=True)
  kw = dict(batch_size=2, image_size=224, resize=256, seed=0, score_map=score_map, num_epochs=1, max_upscale=None)
  for x, y in zip(pipeline.train_loader(original, range(6), **kw), pipeline.train_loader(resized, range(6), **kw)):
    np.testing.assert_array_equal(x["image"], y["image"])


def test_training_refuses_a_pre_resized_dataset_built_for_another_resize(builds, tmp_path):
  config = smoke.get_config()
  with config.unlocked():
    config.data.name = "csv"
    config.data.data_dir = str(builds[256])
    config.data.resize = 320
  # data_setup opens csv datasets by name; point it at the "photos" build.
  src = data.source("csv", builds[256], config="photos")
  with pytest.raises(ValueError, match=r"stored at a short side of 256 .* but data\.resize=320; set "
                                       r"--config\.data\.resize=256"):
    data_setup.check_stored_size(src, config, "csv")
  with config.unlocked():
    config.data.resize = 256
  data_setup.check_stored_size(src, config, "csv")


def test_prefetch_to_device_gives_the_same_batches_in_the_same_order():
  mesh = mesh_lib.make_mesh()
  sharding = mesh_lib.batch_sharding(mesh)
  host = [{"image": np.full((2, 4, 4, 3), i, np.uint8), "index": np.array([i, -i])} for i in range(7)]
  for size in (0, 1, 2, 10):
    got = list(mesh_lib.prefetch_to_device(iter(host), sharding, size=size))
    assert len(got) == len(host)
    for a, b in zip(got, host):
      assert isinstance(a["image"], jax.Array) and a["image"].sharding == sharding
      np.testing.assert_array_equal(np.asarray(a["image"]), b["image"])
      np.testing.assert_array_equal(np.asarray(a["index"]), b["index"])
  # Ahead of the consumer: after the first batch is taken, `size` more were already pulled from the host.
  pulled = []

  def source():
    for b in host:
      pulled.append(int(b["index"][0]))
      yield b

  it = mesh_lib.prefetch_to_device(source(), sharding, size=2)
  next(it)
  assert pulled == [0, 1, 2]
