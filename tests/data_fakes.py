"""Fake IQA releases for the data tests: the REAL label files, tiny synthetic images at the exact paths they name.

Every writer lays the folder out like the official release (the layout mcpf_jax.data.layouts reads) and returns
its root. Images are 8x8 pictures encoded in the format their extension says (JPEG, PNG, BMP), with a colour that
depends on the file's position, so files differ. Nothing here imports mcpf_jax: the tests compare what the
builders read against these independent parses of the label files.
"""

from __future__ import annotations

import csv
import functools
import io
import os
import pathlib
import shutil

import numpy as np
import scipy.io
from PIL import Image

_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP"}

# LIQE's own tables (zwx8981/LIQE BIQA_benchmark.py: `dist_map`, `map2label`, `scene2label`), copied as the
# independent reference for the label join.
LIQE_DIST_MAP = {
    "jpeg2000 compression": "jpeg2000 compression", "jpeg compression": "jpeg compression", "white noise": "noise",
    "gaussian blur": "blur", "fastfading": "jpeg2000 compression", "fnoise": "noise", "contrast": "contrast",
    "lens": "blur", "motion": "blur", "diffusion": "color", "shifting": "blur", "color quantization": "quantization",
    "oversaturation": "color", "desaturation": "color", "white with color": "noise", "impulse": "noise",
    "multiplicative": "noise", "white noise with denoise": "noise", "brighten": "overexposure",
    "darken": "underexposure", "shifting the mean": "other", "jitter": "spatial", "noneccentricity patch": "spatial",
    "pixelate": "spatial", "quantization": "quantization", "color blocking": "spatial", "sharpness": "contrast",
    "realistic blur": "blur", "realistic noise": "noise", "underexposure": "underexposure",
    "overexposure": "overexposure", "realistic contrast change": "contrast", "other realistic": "other"}
LIQE_MAP2LABEL = {"jpeg2000 compression": 0, "jpeg compression": 1, "noise": 2, "blur": 3, "color": 4, "contrast": 5,
                  "overexposure": 6, "underexposure": 7, "spatial": 8, "quantization": 9, "other": 10}
LIQE_SCENE2LABEL = {"animal": 0, "cityscape": 1, "human": 2, "indoor": 3, "landscape": 4, "night": 5, "plant": 6,
                    "still_life": 7, "others": 8}


def liqe_labels(folder: pathlib.Path) -> dict[str, tuple[int, np.ndarray]]:
  """{path: (coarse distortion index, [9] bool scenes)} from every *_clip.txt under folder, by LIQE's tables."""
  out = {}
  for f in sorted(folder.rglob("*_clip.txt")):
    for line in f.read_text().splitlines():
      path, _, dist, *scenes = line.split("\t")
      hot = np.zeros(9, bool)
      for sc in scenes:
        if sc != "invalid":
          hot[LIQE_SCENE2LABEL[sc]] = True
      out[path] = (LIQE_MAP2LABEL[LIQE_DIST_MAP[dist]], hot)
  return out


def fast_tmp(tmp_path_factory, name: str) -> pathlib.Path:
  """A temporary folder in RAM (/dev/shm) where there is one: creating 10k files there is ~15x faster than on
  disk. Falls back to pytest's tmp_path_factory."""
  import tempfile
  shm = pathlib.Path("/dev/shm")
  if shm.is_dir() and os.access(shm, os.W_OK):
    return pathlib.Path(tempfile.mkdtemp(prefix=f"mcpf-{name}-", dir=shm))
  return tmp_path_factory.mktemp(name)


def manual(path: pathlib.Path):
  import tensorflow_datasets as tfds
  return tfds.download.DownloadConfig(manual_dir=str(path))


@functools.cache
def encoded(suffix: str, k: int) -> bytes:
  """An 8x8 image in the format of `suffix`, colour k (mod 64)."""
  k %= 64
  pixels = np.zeros((8, 8, 3), np.uint8)
  pixels[..., 0] = 4 * k
  pixels[..., 1] = 255 - 4 * k
  pixels[::2, ::2, 2] = 200
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format=_FORMATS[suffix.lower()])
  return buf.getvalue()


def write_images(root: pathlib.Path, rel_paths: list[str]) -> None:
  made = set()
  for k, rel in enumerate(rel_paths):
    path = root / rel
    if path.parent not in made:
      path.parent.mkdir(parents=True, exist_ok=True)
      made.add(path.parent)
    path.write_bytes(encoded(path.suffix, k))


def read_csv(path: pathlib.Path) -> list[dict[str, str]]:
  with open(path, newline="", encoding="utf-8-sig") as f:
    return list(csv.DictReader(f))


def write_csv(path: pathlib.Path, header: list[str], rows: list[list[object]], line_end: str = "\n") -> None:
  with open(path, "w", newline="", encoding="utf-8") as f:
    csv.writer(f, lineterminator=line_end).writerows([header] + rows)


# ---------------------------------------------------------------------------------------------------------------


def koniq(tmp: pathlib.Path, labels: pathlib.Path, select: slice = slice(None), official_name: bool = False,
          sets_too: bool = False) -> pathlib.Path:
  """koniq10k_distributions_sets.csv (or, official_name, the download's koniq10k_scores_and_distributions.csv
  rebuilt from it: MOS = mean of the c1..c5 distribution on 1-5, MOS_zscore = the 0-100 MOS, no set column;
  sets_too adds the sets file beside it)."""
  root = tmp / "koniq10k"
  rows = read_csv(labels / "koniq10k" / "koniq10k_distributions_sets.csv")[select]
  write_images(root, [f"1024x768/{r['image_name']}" for r in rows])
  if official_name:
    header = ["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "MOS_zscore"]
    out = []
    for r in rows:
      mean5 = sum((i + 1) * float(r[f"c{i + 1}"]) for i in range(5))
      out.append([r["image_name"]] + [r[f"c{i}"] for i in range(1, 6)] + [r["c_total"], repr(mean5), r["SD"], r["MOS"]])
    write_csv(root / "koniq10k_scores_and_distributions.csv", header, out)
  if not official_name or sets_too:
    header = list(rows[0].keys())
    write_csv(root / "koniq10k_distributions_sets.csv", header, [[r[h] for h in header] for r in rows])
  return root


def spaq(tmp: pathlib.Path, labels: pathlib.Path, select: slice = slice(None), official_xlsx: bool = False,
         images: bool = True) -> pathlib.Path:
  """pyiqa's meta_info_SPAQDataset.csv at the root (or, official_xlsx, the two official Annotations/*.xlsx sheets
  rebuilt from it)."""
  root = tmp / "spaq"
  src = labels / "spaq" / "meta_info_SPAQDataset.csv"
  with open(src, newline="", encoding="utf-8") as f:
    table = list(csv.reader(f))
  header, rows = table[0], table[1:][select]
  if images:
    write_images(root, [f"TestImage/{r[0]}" for r in rows])
  else:
    (root / "TestImage").mkdir(parents=True)
  if official_xlsx:
    import openpyxl
    (root / "Annotations").mkdir()
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(header[:7])
    for r in rows:
      ws.append([r[0]] + [float(v) for v in r[1:7]])
    wb.save(root / "Annotations" / "MOS and Image attribute scores.xlsx")
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append([header[0]] + header[7:16])
    for r in rows:
      ws.append([r[0]] + [float(v) for v in r[7:16]])
    wb.save(root / "Annotations" / "Scene category labels.xlsx")
  elif select == slice(None):
    shutil.copy(src, root / "meta_info_SPAQDataset.csv")
  else:
    write_csv(root / "meta_info_SPAQDataset.csv", header, rows, "\r\n")
  return root


LIVE_FOLDERS = (("jp2k", 227), ("jpeg", 233), ("wn", 174), ("gblur", 174), ("fastfading", 174))


def live(tmp: pathlib.Path, labels: pathlib.Path, official_refnames: bool = False) -> pathlib.Path:
  """The 982 bmp files of the 5 folders, dmos_realigned.mat and refnames_all.mat as given (the refnames there are
  a re-indexed 779-entry copy), and info.txt per folder with `<reference> <imgN.bmp> <parameter>` lines for the
  779 distorted images, from pyiqa's meta_info (which lists each distorted image's reference). With
  official_refnames, refnames_all.mat is rewritten in the official 1x982 layout instead (references of the 203
  reference copies are unknown here and set to the previous entry's)."""
  root = tmp / "databaserelease2"
  names = [f"{d}/img{k}.bmp" for d, n in LIVE_FOLDERS for k in range(1, n + 1)]
  write_images(root, names)
  shutil.copy(labels / "live_release2" / "dmos_realigned.mat", root / "dmos_realigned.mat")
  ref_of = {r["dist_name"]: r["ref_name"].split("/")[-1]
            for r in read_csv(labels / "pyiqa_meta_info" / "meta_info_LIVEIQADataset.csv")}
  for d, _ in LIVE_FOLDERS:
    lines = [f"{ref_of[n]} {n.split('/')[1]} 1.0" for n in names if n.startswith(d + "/") and n in ref_of]
    (root / d / "info.txt").write_text("\n".join(lines) + "\n")
  if official_refnames:
    refs, last = [], "placeholder.bmp"
    for n in names:
      last = ref_of.get(n, last)
      refs.append(last)
    cell = np.empty((1, len(refs)), dtype=object)
    for k, r in enumerate(refs):
      cell[0, k] = np.array([r])
    scipy.io.savemat(root / "refnames_all.mat", {"refnames_all": cell})
  else:
    shutil.copy(labels / "live_release2" / "refnames_all.mat", root / "refnames_all.mat")
  return root


CSIQ_FOLDER = {"AWGN": "awgn", "BLUR": "blur", "contrast": "contrast", "fnoise": "fnoise", "JPEG": "jpeg",
               "jpeg2000": "jpeg2000"}


def csiq_label_rows(labels: pathlib.Path) -> list[tuple[str, float]]:
  lines = (labels / "csiq" / "csiq_label.txt").read_text().split("\n")
  return [(l.split()[0], float(l.split()[1])) for l in lines if l.strip()]


def csiq(tmp: pathlib.Path, labels: pathlib.Path, official_xlsx: bool = False) -> pathlib.Path:
  """dst_imgs/<type>/<name> for the 866 rows, src_imgs/<ref>.png, and csiq_label.txt (or, official_xlsx, a
  csiq.DMOS.xlsx in the official `all_by_image` layout rebuilt from it: 3 title rows, header in row 4 from column
  D, dst_type names noise/blur/contrast/fnoise/jpeg/jpeg 2000, a made-up dmos_std = dmos / 10)."""
  root = tmp / "CSIQ"
  rows = csiq_label_rows(labels)
  write_images(root, [f"dst_imgs/{CSIQ_FOLDER[n.split('.')[1]]}/{n}" for n, _ in rows])
  write_images(root, sorted({f"src_imgs/{n.split('.')[0]}.png" for n, _ in rows}))
  if official_xlsx:
    import openpyxl
    xlsx_type = {"AWGN": "noise", "BLUR": "blur", "contrast": "contrast", "fnoise": "fnoise", "JPEG": "jpeg",
                 "jpeg2000": "jpeg 2000"}
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = "all_by_image"
    ws.append(["CSIQ DMOS"])
    ws.append([])
    ws.append([])
    ws.append([None, None, None, "image", "dst_idx", "dst_type", "dst_lev", "dmos_std", "dmos"])
    for n, dmos in rows:
      ref, typ, lev, _ = n.split(".")
      image = int(ref) if ref.isdigit() else ref
      ws.append([None, None, None, image, 1, xlsx_type[typ], int(lev), dmos / 10, dmos])
    wb.create_sheet("notes")
    wb.save(root / "csiq.DMOS.xlsx")
  else:
    shutil.copy(labels / "csiq" / "csiq_label.txt", root / "csiq_label.txt")
  return root


def tid2013(tmp: pathlib.Path, labels: pathlib.Path) -> pathlib.Path:
  root = tmp / "tid2013"
  root.mkdir()
  for f in ("mos_with_names.txt", "mos_std.txt"):
    shutil.copy(labels / "tid2013" / f, root / f)
  names = [l.split()[1] for l in (root / "mos_with_names.txt").read_text().splitlines() if l.strip()]
  write_images(root, [f"distorted_images/{n}" for n in names])
  write_images(root, [f"reference_images/I{k:02d}.BMP" for k in range(1, 26)])
  return root


def kadid(tmp: pathlib.Path, labels: pathlib.Path, select: slice = slice(None), images: bool = True) -> pathlib.Path:
  root = tmp / "kadid10k"
  rows = read_csv(labels / "kadid10k" / "dmos.csv")[select]
  if images:
    write_images(root, [f"images/{r['dist_img']}" for r in rows] + sorted({f"images/{r['ref_img']}" for r in rows}))
  else:
    (root / "images").mkdir(parents=True)
  write_csv(root / "dmos.csv", ["dist_img", "ref_img", "dmos", "var"],
            [[r["dist_img"], r["ref_img"], r["dmos"], r["var"]] for r in rows])
  return root


def agiqa1k(tmp: pathlib.Path, labels: pathlib.Path) -> pathlib.Path:
  import openpyxl
  root = tmp / "AGIQA-1K"
  root.mkdir()
  shutil.copy(labels / "agiqa1k" / "AIGC_MOS_Zscore.xlsx", root / "AIGC_MOS_Zscore.xlsx")
  ws = openpyxl.load_workbook(root / "AIGC_MOS_Zscore.xlsx", read_only=True).active
  names = [r[0] for r in ws.iter_rows(min_row=2, values_only=True)]
  write_images(root, [f"file/{n}" for n in names])
  return root


def agiqa3k(tmp: pathlib.Path, labels: pathlib.Path) -> pathlib.Path:
  root = tmp / "AGIQA-3K"
  root.mkdir()
  shutil.copy(labels / "agiqa3k" / "data.csv", root / "data.csv")
  write_images(root, [r["name"] for r in read_csv(root / "data.csv")])
  return root


def aigciqa2023(tmp: pathlib.Path, labels: pathlib.Path, seed: int = 0) -> tuple[pathlib.Path, np.ndarray]:
  """Image/allimg/<k>.png for k < 2400, the real prompts and pic-index xlsx, and SYNTHETIC DATA/MOS/mosz1.mat and
  DATA/STD/SD1.mat (`MOSz`, `SD`: 2400x1 doubles, the layout public loaders read; the real values were not
  obtained). Returns the root and the synthetic MOS."""
  root = tmp / "AIGCIQA2023"
  write_images(root, [f"Image/allimg/{k}.png" for k in range(2400)])
  rng = np.random.default_rng(seed)
  mos = rng.uniform(20, 80, size=(2400, 1))
  (root / "DATA" / "MOS").mkdir(parents=True)
  (root / "DATA" / "STD").mkdir(parents=True)
  scipy.io.savemat(root / "DATA" / "MOS" / "mosz1.mat", {"MOSz": mos})
  scipy.io.savemat(root / "DATA" / "STD" / "SD1.mat", {"SD": mos / 10})
  for f in ("AIGCIQA2023_Prompts.xlsx", "pic-index.xlsx"):
    shutil.copy(labels / "aigciqa2023" / f, root / f)
  return root, mos.ravel()
