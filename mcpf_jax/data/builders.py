"""TFDS builders for the IQA benchmarks: the official release folder (manual_dir) in, array_record files out.

Building and reading need no TensorFlow: tensorflow-datasets serializes the records with its own protobuf code and
writes array_record, and `as_data_source` reads them back with random access.

Every builder writes ONE split, `full`, with the examples in label-file order and shuffling disabled, so record i is
entry i of the metadata's per-record index (names, content ids, MOS, official split); train/test splits are index
lists made from that index (mcpf_jax.data.splits), not separate files. The dataset-level metadata (direction of the
score, its range, label-file hashes, skipped rows, ...) is in `builder.info.metadata` (metadata.json beside the
records).

Record (FEATURES):
  image           bytes    the image file's original bytes (never re-encoded)
  name            str      path relative to the release folder, e.g. "Images/611.JPG"
  mos             float32  the score as the label file gives it (DMOS stays DMOS: see metadata higher_is_better)
  mos_std         float32  its standard deviation as given, NaN where the release has none
  content_id      str      the image itself / its reference image / its prompt (splits never divide a content)
  official_split  str      "training" / "validation" / "test" where the release defines a split, else ""
  scene           bool[9]  multi-hot over mcpf_jax.classes.SCENES (all False where has_scene is False)
  has_scene       bool
  distortion      int32    index into mcpf_jax.classes.DISTORTIONS (11 coarse classes), -1 where none
  distortion_fine int32    index into liqe.FINE_DISTORTIONS (LIQE's 33 names), -1 where none
  has_distortion  bool
  index           int64    the record's position (= its entry in the metadata index)
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging as std_logging
import pathlib
import sys
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from tensorflow_datasets.core.utils import tqdm_utils

from mcpf_jax import classes, images
from mcpf_jax.data import collect, csv_layout, layouts, problems, readers, registry

SPLIT = "full"  # the one TFDS "split" (its word) a builder writes; train/val/test come from data.splits
DATASET_VERSION = "1.0.0"

FEATURES = tfds.features.FeaturesDict({
    "image": tfds.features.Tensor(shape=(), dtype=np.object_),
    "name": tfds.features.Text(),
    "mos": tfds.features.Scalar(dtype=np.float32),
    "mos_std": tfds.features.Scalar(dtype=np.float32),
    "content_id": tfds.features.Text(),
    "official_split": tfds.features.Text(),
    "scene": tfds.features.Tensor(shape=(len(classes.SCENES),), dtype=np.bool_),
    "has_scene": tfds.features.Scalar(dtype=np.bool_),
    "distortion": tfds.features.Scalar(dtype=np.int32),
    "distortion_fine": tfds.features.Scalar(dtype=np.int32),
    "has_distortion": tfds.features.Scalar(dtype=np.bool_),
    "index": tfds.features.Scalar(dtype=np.int64),
})



class _NoTfdsInfo(std_logging.Filter):
  """Drops tfds's own info lines (warnings and errors pass)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or "tensorflow_datasets" not in record.pathname


@contextlib.contextmanager
def quiet_tfds() -> Iterator[None]:
  """Within: no tfds info lines ("Generating dataset", "Done writing", "Load dataset info", ...) and progress bars
  only on a terminal. tfds logs through absl's logger, so the filter is on that logger for tfds's files only; its
  warnings and errors, and everyone else's info lines, are untouched."""
  logger, quiet, bars = logging.get_absl_logger(), _NoTfdsInfo(), tqdm_utils._active  # pylint: disable=protected-access
  logger.addFilter(quiet)
  tfds.display_progress_bar(bars and sys.stderr.isatty())
  try:
    yield
  finally:
    tfds.display_progress_bar(bars)
    logger.removeFilter(quiet)


_INSTRUCTIONS = """\
Download {title} by hand from {homepage} (its licence forbids redistribution) and extract it. Pass the extracted
release folder as manual_dir; it must hold {expected}.
"""


class IqaBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base builder: subclasses set `LAYOUT` (a readers.Layout subclass) and `name`.

  Build options (keyword arguments, besides tfds's data_dir / config / version / file_format):
    skip_bad: skip bad rows and write a JSON report instead of raising (default False).
    report_path: where the skip report goes (default <data_dir>/<name>[-<config>]-skip-report.json).
    liqe_dir: folder with LIQE's split folders (e.g. tests/data/labels/liqe_splits) to join scene and
      distortion labels; None = no labels.
    decode_check: "full" (default; decode every image), "verify" (PIL structure check) or "none".
    num_threads: decode-check threads.
    allow_outside_paths: accept image paths (absolute, `..`, symlinks) outside the release folder; off by default
      (such a row is an error before any image is read); recorded as `metadata["allow_outside_paths"]`.
    resize: store the images pre-resized to this short side (None: the original bytes). An image whose short side
      is larger is decoded and resized as training does (`images.decode(short_side=resize)`) and stored as a
      lossless PNG, so training on it sees exactly the pixels of the on-the-fly path, without decoding the
      full-size file every epoch; smaller images keep their bytes (training resizes them up as usual). Recorded as
      `metadata["resize"]`; training refuses a config whose `data.resize` differs.
  """

  VERSION = tfds.core.Version(DATASET_VERSION)
  RELEASE_NOTES: ClassVar[dict[str, str]] = {
      DATASET_VERSION: "Original bytes, scores as given, content ids, LIQE labels, one `full` split."}
  LAYOUT: type[readers.Layout] = readers.Layout

  def __init__(self, *, skip_bad: bool = False, report_path: str | None = None, liqe_dir: str | None = None,
               decode_check: str = "full", num_threads: int | None = None, resize: int | None = None,
               allow_outside_paths: bool = False, **kwargs: Any):
    if resize is not None and int(resize) < 1:
      raise ValueError(f"resize must be a positive short side in pixels, got {resize}")
    self._resize = None if resize is None else int(resize)
    self._skip_bad = skip_bad
    self._report_path = report_path
    self._liqe_dir = liqe_dir
    self._decode_check = decode_check
    self._num_threads = num_threads
    self._allow_outside_paths = bool(allow_outside_paths)
    self.skip_report: pathlib.Path | None = None
    super().__init__(**kwargs)

  def layout(self) -> readers.Layout:
    return self.LAYOUT()

  def download_and_prepare(self, **kwargs: Any) -> None:
    """tfds's build (same arguments), saying one line when it writes the dataset: what, how many records, where."""
    with quiet_tfds():
      super().download_and_prepare(**kwargs)

  def _log_download_bytes(self) -> None:
    pass  # tfds prints "Downloading and preparing dataset Unknown size ...": nothing is downloaded, sizes unknown

  def _log_download_done(self) -> None:
    # Instead of tfds's "Dataset ... downloaded and prepared to ...": called once the records are written.
    config = f"/{self.builder_config.name}" if self.builder_config else ""
    logging.info("built dataset %s%s: %d records in %s", self.name, config,
                 self.info.splits[SPLIT].num_examples, self.data_dir)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds's default probes `importlib_resources` (an optional etils extra, not installed); this file is the answer.
    return epath.Path(__file__)

  @property
  def MANUAL_DOWNLOAD_INSTRUCTIONS(self) -> str:  # pylint: disable=invalid-name  (tfds's attribute name)
    lay = self.layout()
    return _INSTRUCTIONS.format(title=lay.title, homepage=lay.homepage or "its authors", expected=lay.expected)

  def _info(self) -> tfds.core.DatasetInfo:
    lay = self.layout()
    static = {"dataset": lay.name, "title": lay.title, "mos_kind": lay.mos_kind,
              "higher_is_better": lay.higher_is_better,
              "mos_range": list(lay.mos_range) if lay.mos_range else None, "content_kind": lay.content_kind,
              "official_split_names": list(lay.official_splits)}
    return tfds.core.DatasetInfo(
        builder=self, description=f"{lay.title}: {lay.__doc__}", features=FEATURES, homepage=lay.homepage or None,
        metadata=tfds.core.MetadataDict(static), disable_shuffling=True)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    root = pathlib.Path(dl_manager._manual_dir or "")  # pylint: disable=protected-access  (its checks are ours)
    lay = self.layout()
    result = collect.collect(lay, root, skip_bad=self._skip_bad, decode_check=self._decode_check,
                             liqe_dir=self._liqe_dir, liqe_folder=self._liqe_folder(), num_threads=self._num_threads,
                             allow_outside_paths=self._allow_outside_paths)
    if self._skip_bad:
      self.skip_report = pathlib.Path(self._report_path) if self._report_path else self._default_report_path()
      problems.write_report(self.skip_report, lay.name, str(root), result.log, len(result.examples))
      result.metadata["skip_report"] = str(self.skip_report)
    if not result.examples:
      raise problems.DatasetError(lay.name, str(root), None, "no examples left to build")
    self.info.metadata.update(result.metadata)
    self.info.metadata["resize"] = self._resize
    if self._resize:
      self.info.metadata["resize_format"] = "png"
    return {SPLIT: self._generate_examples(result.examples)}

  def _liqe_folder(self) -> str | None:
    return None

  def _default_report_path(self) -> pathlib.Path:
    config = f"-{self.builder_config.name}" if self.builder_config else ""
    return pathlib.Path(self._data_dir_root) / f"{self.name}{config}-skip-report.json"

  def _generate_examples(self, examples: list[collect.Example]):
    for i, e in enumerate(examples):
      yield i, {
          "image": _stored_bytes(e.path.read_bytes(), e.name, self._resize),
          "name": e.name,
          "mos": np.float32(e.mos),
          "mos_std": np.float32(e.mos_std),
          "content_id": e.content_id,
          "official_split": e.official_split,
          "scene": np.asarray(e.scene, np.bool_),
          "has_scene": e.has_scene,
          "distortion": np.int32(e.distortion),
          "distortion_fine": np.int32(e.distortion_fine),
          "has_distortion": e.has_distortion,
          "index": np.int64(i),
      }


def _stored_bytes(data: bytes, name: str, resize: int | None) -> bytes:
  """The original bytes, or with `resize` an image larger than that as a PNG at short side `resize`."""
  if resize is None:
    return data
  with PIL.Image.open(io.BytesIO(data)) as img:  # the short side does not depend on the EXIF orientation
    if min(img.size) <= resize:
      return data
  small = images.decode(data, name, short_side=resize)
  buf = io.BytesIO()
  PIL.Image.fromarray(small).save(buf, format="PNG")
  return buf.getvalue()


def _builder_class(layout_cls: type[readers.Layout]) -> type[IqaBuilder]:
  cls = type(layout_cls.__name__, (IqaBuilder,), {"name": layout_cls.name, "LAYOUT": layout_cls,
                                                   "__doc__": f"TFDS builder of {layout_cls.title}.",
                                                   "__module__": __name__},
             skip_registration=True)
  return cls


class Live(IqaBuilder, skip_registration=True):
  """TFDS builder of LIVE IQA release 2. Extra option: dmos = "auto" | "realigned" | "original"."""
  name = "live"
  LAYOUT = layouts.Live

  def __init__(self, *, dmos: str = "auto", **kwargs: Any):
    self._dmos = dmos
    super().__init__(**kwargs)

  def layout(self) -> readers.Layout:
    return layouts.Live(dmos=self._dmos)


def _config_field(f: dataclasses.Field) -> tuple[str, Any, dataclasses.Field]:
  # A config has defaults only (tfds's own fields come first): the required csv_path defaults to "".
  default = "" if f.default is dataclasses.MISSING else f.default
  return f.name, f.type, dataclasses.field(default=default, metadata=f.metadata)


def _spec(self) -> csv_layout.CsvSpec:
  return csv_layout.CsvSpec(**{f.name: getattr(self, f.name) for f in dataclasses.fields(csv_layout.CsvSpec)})


CsvConfig = dataclasses.make_dataclass(
    "CsvConfig", [_config_field(f) for f in dataclasses.fields(csv_layout.CsvSpec)],
    bases=(tfds.core.BuilderConfig,), eq=False,
    namespace={"spec": _spec, "__module__": __name__, "__doc__": (
        "A user's csv dataset: the config name names the dataset's folder (data_dir/csv/<name>/1.0.0).\n\n"
        "  Its fields besides tfds's are those of csv_layout.CsvSpec (made from it), which documents them.\n")})
CsvConfig.__qualname__ = "CsvConfig"
SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(csv_layout.CsvSpec))


class Csv(IqaBuilder, skip_registration=True):
  """TFDS builder of a user's folder of images + a csv (image path and mos columns).

  Give the columns with `config=CsvConfig(name=..., csv_path=..., image_column=..., ...)`, or as keyword
  arguments (`Csv(csv_path=..., mos_column=..., config_name="mydata")`), which make that config.
  """
  name = registry.CSV
  LAYOUT = csv_layout.CsvLayout

  def __init__(self, *, config: CsvConfig | str | None = None, config_name: str = "default", **kwargs: Any):
    spec_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in SPEC_FIELDS}
    if config is None:
      if "csv_path" not in spec_kwargs:
        raise ValueError("csv builder: give config=CsvConfig(...) or csv_path=... (plus image_column, mos_column, ...)")
      config = CsvConfig(name=config_name, **spec_kwargs)
    elif spec_kwargs:
      raise ValueError(f"csv builder: give either config or {sorted(spec_kwargs)}, not both")
    super().__init__(config=config, **kwargs)

  def _create_builder_config(self, builder_config, version):
    # A user's config is never one of BUILDER_CONFIGS: take it as it is (tfds would log the whole of it as
    # "Using custom data configuration").
    if isinstance(builder_config, CsvConfig):
      return builder_config
    return super()._create_builder_config(builder_config, version)

  def layout(self) -> readers.Layout:
    config = self.builder_config
    if not isinstance(config, CsvConfig):
      raise ValueError(f"csv builder needs a CsvConfig, got {config!r}")
    return csv_layout.CsvLayout(config.spec())

  def _liqe_folder(self) -> str | None:
    return self.builder_config.liqe_folder


# One builder per name of the registry: the layout's own class, Live (its dmos option) and Csv (its config).
_CODED: dict[str, type[IqaBuilder]] = {Live.name: Live, Csv.name: Csv}
BUILDERS: dict[str, type[IqaBuilder]] = {
    name: _CODED.get(name) or _builder_class(registry.LAYOUTS[name]) for name in registry.NAMES}
