"""The ten benchmarks' release layouts (see readers.py for the Layout type and the readers they use).

Table-shaped releases (one label file with name / score / std columns and an image folder: KADID-10k, AGIQA-1K,
AGIQA-3K) are declared as a `readers.Table` and read by `readers.TableLayout`; the others are coded, each for what
its release really holds: CLIVE's and LIVE's MATLAB files, KonIQ's two label-file variants and split file, SPAQ's
xlsx or csv with scene labels, CSIQ's xlsx of type tokens, TID2013's text files, AIGCIQA2023's MATLAB scores and
prompt index. The registry of them all is registry.py.
"""

from __future__ import annotations

import collections
import math
import re
from typing import Any, ClassVar

import numpy as np

from mcpf_jax.data.readers import (
  Layout,
  Listing,
  Table,
  TableLayout,
  checked_row,
  first_existing,
  image_name,
  join,
  listing,
  load_mat,
  mat_numbers,
  mat_strings,
  read_csv,
  read_xlsx,
  to_float,
  xlsx_table,
)

# SPAQ's scene columns in the order of mcpf_jax.classes.SCENES (same nine categories as LIQE).
_SPAQ_SCENES = ("Animal", "Cityscape", "Human", "Indoor scene", "Landscape", "Night scene", "Plant", "Still-life",
                "Others")


# ---------------------------------------------------------------------------------------------------------------
# Authentic distortions.


class Livec(Layout):
  """LIVE In the Wild Image Quality Challenge (ChallengeDB_release): 1162 test images (+ t1..t7, excluded)."""
  name = "livec"
  title = "LIVE In the Wild Image Quality Challenge Database"
  homepage = "https://live.ece.utexas.edu/research/ChallengeDB/index.html"
  mos_range = (0.0, 100.0)
  required = (("Data/AllImages_release.mat",), ("Data/AllMOS_release.mat",), ("Data/AllStdDev_release.mat",),
              ("Images",))
  expected = "Data/AllImages_release.mat, Data/AllMOS_release.mat, Data/AllStdDev_release.mat and Images/"
  _TRAINING = re.compile(r"^t\d+\.bmp$", re.IGNORECASE)

  def read(self, root, log):
    names_file, mos_file = "Data/AllImages_release.mat", "Data/AllMOS_release.mat"
    std_file = "Data/AllStdDev_release.mat"
    names = mat_strings(self, root / names_file, "AllImages_release")
    mos = mat_numbers(self, root / mos_file, "AllMOS_release")
    std = mat_numbers(self, root / std_file, "AllStdDev_release")
    if not len(names) == len(mos) == len(std):
      raise self.error(root / "Data", None, f"the .mat files disagree in length: {len(names)} names, {len(mos)} MOS, "
                       f"{len(std)} std (each entry k of the three files describes the same image)")
    rows, excluded = [], collections.Counter()
    for k, (n, m, s) in enumerate(zip(names, mos, std)):
      # The official release lists its 7 training images t1..t7 (in Images/trainingImages/) first; the benchmark
      # is the 1162 test images.
      if self._TRAINING.match(n):
        excluded["training images t1..t7 (Images/trainingImages/)"] += 1
        continue
      r = checked_row(self, log, name=join("Images", n) if n else "", mos=float(m), mos_std=float(s),
                      content_id=join("Images", n), file=names_file, row=f"entry {k + 1}", mos_file=mos_file)
      if r:
        rows.append(r)
    return Listing(rows, [names_file, mos_file, std_file], [("Images", False)], excluded=dict(excluded))


class Koniq10k(Layout):
  """KonIQ-10k: 10073 images, official training/validation/test split."""
  name = "koniq10k"
  title = "KonIQ-10k"
  homepage = "http://database.mmsp-kn.de/koniq-10k-database.html"
  mos_range = (0.0, 100.0)
  official_splits = ("training", "validation", "test")
  OFFICIAL = "koniq10k_scores_and_distributions.csv"
  SETS = "koniq10k_distributions_sets.csv"
  required = ((OFFICIAL, SETS, f"metadata/{SETS}"), ("1024x768", "512x384"))
  expected = (f"{OFFICIAL} (or the GitHub metadata file {SETS}) and the image folder 1024x768/ (or 512x384/)")

  def read(self, root, log):
    image_dir = first_existing(root, ("1024x768", "512x384"))
    sets_rel = first_existing(root, (self.SETS, f"metadata/{self.SETS}"))
    splits: dict[str, str] = {}
    sets_rows = None
    if sets_rel:
      sets_rows = read_csv(self, root / sets_rel, ("image_name", "MOS", "SD", "set"))
      splits = {r["image_name"].strip(): r["set"].strip() for _, r in sets_rows}
    notes: dict[str, Any] = {"image_dir": image_dir}
    if (root / self.OFFICIAL).exists():
      # The download's own file: MOS on the 5-point scale and MOS_zscore on 0-100. The 0-100 column is the one the
      # GitHub metadata file calls MOS, so both variants give the same scale.
      label_file, mos_col = self.OFFICIAL, "MOS_zscore"
      table = read_csv(self, root / label_file, ("image_name", "MOS_zscore", "SD"))
      notes["split_source"] = sets_rel or "none (the official split is in koniq10k_distributions_sets.csv)"
    else:
      label_file, mos_col, table = sets_rel, "MOS", sets_rows
      notes["split_source"] = sets_rel
    notes.update(label_file=label_file, mos_column=mos_col,
                 mos_std_note="SD is the standard deviation on the 5-point ACR scale, as given (MOS is 0-100)")
    rows = []
    for line, r in table:
      n = r["image_name"].strip()
      row = checked_row(self, log, name=join(image_dir, n) if n else "", mos=to_float(r[mos_col]),
                        mos_std=to_float(r["SD"]), content_id=join(image_dir, n), file=label_file,
                        row=f"line {line}", official_split=splits.get(n, ""))
      if row:
        rows.append(row)
    files = [label_file] + ([sets_rel] if sets_rel and sets_rel != label_file else [])
    return Listing(rows, files, [(image_dir, False)], notes=notes)


class Spaq(Layout):
  """SPAQ: 11125 smartphone photos with MOS (0-100) and scene labels."""
  name = "spaq"
  title = "SPAQ (Smartphone Photography Attribute and Quality)"
  homepage = "https://github.com/h4nwei/SPAQ"
  mos_range = (0.0, 100.0)
  XLSX = "Annotations/MOS and Image attribute scores.xlsx"
  SCENE_XLSX = "Annotations/Scene category labels.xlsx"
  CSV = "meta_info_SPAQDataset.csv"
  required = ((XLSX, CSV, f"Annotations/{CSV}"), ("TestImage",))
  expected = (f"TestImage/ and {XLSX} (or pyiqa's {CSV})")

  def read(self, root, log):
    notes: dict[str, Any] = {}
    scenes: dict[str, tuple[bool, ...] | None] = {}
    if (root / self.XLSX).exists():
      label_file = self.XLSX
      table = xlsx_table(self, root / label_file, ("Image name", "MOS"))
      if (root / self.SCENE_XLSX).exists():
        for _, r in xlsx_table(self, root / self.SCENE_XLSX, ("Image name",) + _SPAQ_SCENES):
          scenes[image_name(r["Image name"])] = self._scene(r)
        notes["scene_source"] = self.SCENE_XLSX
    else:
      label_file = first_existing(root, (self.CSV, f"Annotations/{self.CSV}"))
      table = read_csv(self, root / label_file, ("Image name", "MOS") + _SPAQ_SCENES)
      for _, r in table:
        scenes[r["Image name"].strip()] = self._scene(r)
      notes["scene_source"] = label_file
    notes["label_file"] = label_file
    rows = []
    for line, r in table:
      n = image_name(r["Image name"])
      row = checked_row(self, log, name=join("TestImage", n) if n else "", mos=to_float(r["MOS"]), mos_std=math.nan,
                        content_id=join("TestImage", n), file=label_file, row=f"row {line}",
                        scene=scenes.get(n))
      if row:
        rows.append(row)
    files = [label_file] + ([notes["scene_source"]] if notes.get("scene_source", label_file) != label_file else [])
    return Listing(rows, files, [("TestImage", False)], notes=notes)

  @staticmethod
  def _scene(r: dict[str, Any]) -> tuple[bool, ...] | None:
    # SPAQ gives each image's scene labels as fractions (1/k for k labels); a label is present where > 0.
    values = [to_float(r[c]) for c in _SPAQ_SCENES]
    hot = tuple(bool(v > 0) for v in values)
    return hot if any(hot) else None


# ---------------------------------------------------------------------------------------------------------------
# Synthetic distortions.


class Live(Layout):
  """LIVE IQA release 2: 982 entries = 779 distorted images + 203 copies of the 29 references (not rated)."""
  name = "live"
  title = "LIVE Image Quality Assessment Database, release 2"
  homepage = "https://live.ece.utexas.edu/research/quality/subjective.htm"
  mos_kind = "DMOS"
  higher_is_better = False
  mos_range = None  # realigned DMOS (the default) spans about -3..112; set to 0-100 when dmos.mat is read
  content_kind = "reference"
  FOLDERS = (("jp2k", 227), ("jpeg", 233), ("wn", 174), ("gblur", 174), ("fastfading", 174))
  required = (("dmos_realigned.mat", "dmos.mat"), ("jp2k",), ("jpeg",), ("wn",), ("gblur",), ("fastfading",))
  expected = ("dmos_realigned.mat (or dmos.mat), refnames_all.mat and the folders jp2k/, jpeg/, wn/, gblur/, "
              "fastfading/ (each with info.txt)")

  def __init__(self, dmos: str = "auto"):
    if dmos not in ("auto", "realigned", "original"):
      raise ValueError(f"live: dmos must be 'auto', 'realigned' or 'original', got {dmos!r}")
    self.dmos = dmos

  def read(self, root, log):
    n_total = sum(n for _, n in self.FOLDERS)
    names = [f"{folder}/img{k}.bmp" for folder, n in self.FOLDERS for k in range(1, n + 1)]
    use_realigned = self.dmos == "realigned" or (self.dmos == "auto" and (root / "dmos_realigned.mat").exists())
    label_file = "dmos_realigned.mat" if use_realigned else "dmos.mat"
    if not (root / label_file).exists():
      raise self.error(root / label_file, None, f"not found (dmos={self.dmos!r}); found {listing(root)}")
    mat = load_mat(self, root / label_file)
    self.mos_range = None if use_realigned else (0.0, 100.0)
    if use_realigned:
      dmos = mat_numbers(self, root / label_file, "dmos_new", mat)
      std = mat_numbers(self, root / label_file, "dmos_std", mat) if "dmos_std" in mat else np.full(n_total, np.nan)
    else:
      dmos = mat_numbers(self, root / label_file, "dmos", mat)
      std = np.full(n_total, np.nan)
    if len(dmos) != n_total or len(std) != n_total:
      raise self.error(root / label_file, None, f"has {len(dmos)} scores; the release has {n_total} entries "
                       "(jp2k 227, jpeg 233, wn 174, gblur 174, fastfading 174, in that order)")
    orgs, orgs_source = self._orgs(root, label_file, mat, dmos, std)
    refs, ref_source = self._references(root, orgs)
    rows, not_rated = [], set()
    for k, name in enumerate(names):
      if orgs[k]:
        not_rated.add(name)
        continue
      row = checked_row(self, log, name=name, mos=float(dmos[k]), mos_std=float(std[k]), content_id=refs[k],
                        file=label_file, row=f"entry {k + 1}")
      if row:
        rows.append(row)
    notes = {"label_file": label_file, "mos_column": "dmos_new" if use_realigned else "dmos",
             "orgs_source": orgs_source, "reference_source": ref_source}
    files = [label_file] + ([ref_source] if ref_source.endswith(".mat") else [f"{f}/info.txt" for f, _ in self.FOLDERS])
    return Listing(rows, files, [(f, False) for f, _ in self.FOLDERS], not_rated=not_rated,
                   excluded={"reference copies (orgs = 1)": int(orgs.sum())}, notes=notes)

  def _orgs(self, root, label_file, mat, dmos, std) -> tuple[np.ndarray, str]:
    """Which of the 982 entries are copies of a reference image (official `orgs`, 1 = copy)."""
    n_total = len(dmos)
    for source, m in ((label_file, mat), ("dmos.mat", None)):
      if m is None:
        if source == label_file or not (root / source).exists():
          continue
        m = load_mat(self, root / source)
      if "orgs" in m and np.asarray(m["orgs"]).size == n_total:
        return np.asarray(m["orgs"]).astype(bool).ravel(), f"{source}:orgs"
    if label_file == "dmos_realigned.mat":
      # Copies circulating with a truncated `orgs` (1x779 zeros): the 203 reference copies are exactly the entries
      # whose realigned DMOS and std are both 0.
      orgs = (dmos == 0) & (std == 0)
      return orgs, "dmos_realigned.mat: dmos_new == 0 and dmos_std == 0 (orgs has the wrong length)"
    raise self.error(root / label_file, None, f"variable 'orgs' missing or not {n_total} long (1 = reference copy)")

  def _references(self, root, orgs) -> tuple[list[str], str]:
    """Reference image name of each entry: refnames_all.mat (official, 1x982) or the folders' info.txt."""
    n_total = len(orgs)
    path = root / "refnames_all.mat"
    why_not_mat = "refnames_all.mat not found"
    if path.exists():
      refs = mat_strings(self, path, "refnames_all")
      if len(refs) == n_total:
        return refs, "refnames_all.mat"
      why_not_mat = (f"refnames_all.mat has {len(refs)} names, but the official file has {n_total} (one per entry, "
                     "in the jp2k, jpeg, wn, gblur, fastfading order)")
    refs, offset = [""] * n_total, 0
    for folder, count in self.FOLDERS:
      info = root / folder / "info.txt"
      if not info.exists():
        raise self.error(root, None, f"cannot tell each image's reference: {why_not_mat}, and {folder}/info.txt is "
                         "missing")
      for line_no, line in enumerate(info.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        tokens = line.split()
        if not tokens:
          continue
        # Lines name the reference and the distorted image (plus the distortion parameter); match by pattern so the
        # column order does not matter.
        dist = [t for t in tokens if re.fullmatch(r"img\d+\.bmp", t, re.IGNORECASE)]
        ref = [t for t in tokens if t.lower().endswith(".bmp") and t not in dist]
        if len(dist) != 1 or len(ref) != 1:
          raise self.error(info, f"line {line_no}", f"expected one reference name and one imgN.bmp name, got {line!r}")
        k = int(re.findall(r"\d+", dist[0])[0])
        if not 1 <= k <= count:
          raise self.error(info, f"line {line_no}", f"{dist[0]} is outside img1..img{count}")
        refs[offset + k - 1] = ref[0]
      offset += count
    missing = [k for k in range(n_total) if not refs[k] and not orgs[k]]
    if missing:
      raise self.error(root, None, f"{why_not_mat}, and info.txt names no reference for {len(missing)} distorted "
                       f"entries (first: entry {missing[0] + 1})")
    return refs, "info.txt"


class Csiq(Layout):
  """CSIQ: 866 distorted images of 30 references; DMOS on 0-1, lower is better."""
  name = "csiq"
  title = "CSIQ (Categorical Subjective Image Quality)"
  homepage = "https://s2.smu.edu/~eclarson/csiq.html"
  mos_kind = "DMOS"
  higher_is_better = False
  mos_range = (0.0, 1.0)
  content_kind = "reference"
  XLSX = "csiq.DMOS.xlsx"
  TXT = "csiq_label.txt"
  required = ((XLSX, TXT), ("dst_imgs", "dst_imgs_all"))
  expected = f"{XLSX} (or HyperIQA's {TXT}) and dst_imgs/<type>/ (or a flat dst_imgs_all/)"
  # File-name token (upper/lower case as in the release) -> folder under dst_imgs/.
  _FOLDER: ClassVar[dict[str, str]] = {"AWGN": "awgn", "BLUR": "blur", "contrast": "contrast", "fnoise": "fnoise",
                                       "JPEG": "jpeg", "jpeg2000": "jpeg2000"}
  # csiq.DMOS.xlsx `dst_type` -> file-name token.
  _TOKEN: ClassVar[dict[str, str]] = {"noise": "AWGN", "awgn": "AWGN", "blur": "BLUR", "contrast": "contrast",
                                      "fnoise": "fnoise", "jpeg": "JPEG", "jpeg 2000": "jpeg2000",
                                      "jpeg2000": "jpeg2000"}

  def read(self, root, log):
    flat = not (root / "dst_imgs").is_dir()
    image_root = "dst_imgs_all" if flat else "dst_imgs"
    entries = []  # (file name, dmos, std, label file, row)
    if (root / self.XLSX).exists():
      label_file = self.XLSX
      table = xlsx_table(self, root / label_file, ("image", "dst_type", "dst_lev", "dmos"), sheet="all_by_image")
      for row_no, r in table:
        ref = image_name(r["image"])
        dst_type = str(r["dst_type"]).strip().lower() if r["dst_type"] is not None else ""
        if not ref and not dst_type:
          continue
        if dst_type not in self._TOKEN:
          raise self.error(root / label_file, f"row {row_no}", f"unknown dst_type {r['dst_type']!r} (expected one of "
                           f"{sorted(set(self._TOKEN))})")
        level = to_float(r["dst_lev"])
        fname = f"{ref}.{self._TOKEN[dst_type]}.{int(level)}.png" if ref and math.isfinite(level) else ""
        entries.append((fname, to_float(r["dmos"]), to_float(r.get("dmos_std")), label_file, f"row {row_no}"))
    else:
      label_file = self.TXT
      for line_no, line in enumerate((root / label_file).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
          continue
        fields = line.split()
        if len(fields) != 2:
          raise self.error(root / label_file, f"line {line_no}", f"expected '<image name> <dmos>', got {line!r}")
        entries.append((fields[0], to_float(fields[1]), math.nan, label_file, f"line {line_no}"))
    rows = []
    for fname, dmos, std, file, where in entries:
      parts = fname.split(".")
      if fname and (len(parts) != 4 or parts[1] not in self._FOLDER):
        raise self.error(root / file, where, f"image name {fname!r} is not <reference>.<TYPE>.<level>.png with TYPE "
                         f"in {sorted(self._FOLDER)}")
      name = "" if not fname else (f"{image_root}/{fname}" if flat else f"dst_imgs/{self._FOLDER[parts[1]]}/{fname}")
      row = checked_row(self, log, name=name, mos=dmos, mos_std=std, content_id=f"{parts[0]}.png" if fname else "",
                        file=file, row=where)
      if row:
        rows.append(row)
    return Listing(rows, [label_file], [(image_root, True)], notes={"label_file": label_file, "image_root": image_root})


class Tid2013(Layout):
  """TID2013: 3000 distorted images of 25 references; MOS on 0-9."""
  name = "tid2013"
  title = "TID2013"
  homepage = "https://www.ponomarenko.info/tid2013.htm"
  mos_range = (0.0, 9.0)
  content_kind = "reference"
  required = (("mos_with_names.txt",), ("distorted_images",))
  expected = "mos_with_names.txt, mos_std.txt and distorted_images/ (and reference_images/)"
  _NAME = re.compile(r"^[iI](\d+)_(\d+)_(\d+)\.bmp$", re.IGNORECASE)

  def read(self, root, log):
    label_file = "mos_with_names.txt"
    lines = [(i, l) for i, l in enumerate((root / label_file).read_text(encoding="utf-8").splitlines(), start=1)
             if l.strip()]
    stds = [math.nan] * len(lines)
    files = [label_file]
    if (root / "mos_std.txt").exists():
      std_lines = [l for l in (root / "mos_std.txt").read_text(encoding="utf-8").splitlines() if l.strip()]
      if len(std_lines) != len(lines):
        raise self.error(root / "mos_std.txt", None, f"has {len(std_lines)} lines but {label_file} has {len(lines)} "
                         "(line k of both describes the same image)")
      stds = [to_float(s) for s in std_lines]
      files.append("mos_std.txt")
    rows = []
    for (line_no, line), std in zip(lines, stds):
      fields = line.split()
      if len(fields) != 2:
        raise self.error(root / label_file, f"line {line_no}", f"expected '<mos> <image name>', got {line!r}")
      mos, fname = to_float(fields[0]), fields[1]
      m = self._NAME.match(fname)
      if not m:
        raise self.error(root / label_file, f"line {line_no}", f"image name {fname!r} is not i<ref>_<type>_<level>.bmp")
      row = checked_row(self, log, name=f"distorted_images/{fname}", mos=mos, mos_std=std,
                        content_id=f"I{int(m.group(1)):02d}", file=label_file, row=f"line {line_no}")
      if row:
        rows.append(row)
    return Listing(rows, files, [("distorted_images", False)])


class Kadid10k(TableLayout):
  """KADID-10k: 10125 distorted images of 81 references; `dmos` is a MOS on 1-5 (higher is better)."""
  name = "kadid10k"
  title = "KADID-10k"
  homepage = "http://database.mmsp-kn.de/kadid-10k-database.html"
  mos_range = (1.0, 5.0)
  content_kind = "reference"
  expected = "dmos.csv and images/"
  table = Table("dmos.csv", image="dist_img", mos="dmos", std="var", std_is_variance=True, content="ref_img",
                content_is_reference=True, folders=("images",),
                notes={"mos_column": "dmos (a MOS on 1-5 despite its name)", "mos_std_note": "mos_std = sqrt(var)"})


# ---------------------------------------------------------------------------------------------------------------
# AI-generated images.


class Agiqa1k(TableLayout):
  """AGIQA-1K: 1080 images from 2 models; normalized MOS (0-5) from AIGC_MOS_Zscore.xlsx; content = prompt."""
  name = "agiqa1k"
  title = "AGIQA-1K"
  homepage = "https://github.com/lcysyzxdxc/AGIQA-1k-Database"
  mos_range = (0.0, 5.0)
  content_kind = "prompt"
  expected = "AIGC_MOS_Zscore.xlsx and the image folder file/ (from file.zip)"
  table = Table("AIGC_MOS_Zscore.xlsx", image="Image", mos="MOS", content="Prompt",
                folders=("file", ".", "images", "Images", "image"), notes={"mos_column": "MOS"})


class Agiqa3k(TableLayout):
  """AGIQA-3K: 2982 images from 6 models; perception MOS `mos_quality`; content = prompt."""
  name = "agiqa3k"
  title = "AGIQA-3K"
  homepage = "https://github.com/lcysyzxdxc/AGIQA-3k-Database"
  mos_range = None  # "normalized MOS", scale not stated: the observed range is recorded
  content_kind = "prompt"
  expected = "data.csv and the images (in the same folder or a subfolder such as images/)"
  table = Table("data.csv", image="name", mos="mos_quality", std="std_quality", content="prompt",
                folders=(".", "images", "Images", "image", "AGIQA-3K", "AGIQA-3k", "agiqa-3k"),
                header_has="mos_quality", notes={"mos_column": "mos_quality (perception; mos_align is not used)"})


class Aigciqa2023(Layout):
  """AIGCIQA2023: 2400 images (6 models x 100 prompts x 4); quality MOS from DATA/MOS/mosz1.mat."""
  name = "aigciqa2023"
  title = "AIGCIQA2023"
  homepage = "https://github.com/wangjiarui153/AIGCIQA2023"
  mos_range = None  # not documented; the observed range is recorded
  content_kind = "prompt"
  required = (("DATA/MOS/mosz1.mat",), ("Image/allimg",))
  expected = "DATA/MOS/mosz1.mat (quality), DATA/STD/SD1.mat and Image/allimg/<k>.png"
  PROMPTS = ("AIGCIQA2023_Prompts.xlsx", "DATA/AIGCIQA2023_Prompts.xlsx", "prompts.xlsx", "DATA/MOS/prompts.xlsx")
  PIC_INDEX = ("pic-index.xlsx", "DATA/pic-index.xlsx")

  def read(self, root, log):
    mos_file, std_file = "DATA/MOS/mosz1.mat", "DATA/STD/SD1.mat"
    mos = mat_numbers(self, root / mos_file, "MOSz")
    n = len(mos)
    files = [mos_file]
    std = np.full(n, np.nan)
    if (root / std_file).exists():
      std = mat_numbers(self, root / std_file, "SD")
      if len(std) != n:
        raise self.error(root / std_file, None, f"has {len(std)} values but {mos_file} has {n}")
      files.append(std_file)
    # Image k.png shows prompt (k % 400) // 4 (6 model groups of 400 = 100 prompts x 4 samples), as in the
    # authors' transer.py.
    prompt_of = [(k % 400) // 4 for k in range(n)]
    prompts_rel = first_existing(root, self.PROMPTS)
    prompts = None
    if prompts_rel:
      values = [v for _, v in read_xlsx(self, root / prompts_rel) if any(x is not None for x in v)]
      if values and [str(x).strip().lower() for x in values[0][:3]] == ["style", "class", "prompt"]:
        values = values[1:]
      if len(values) != 100:
        raise self.error(root / prompts_rel, None,
                         f"has {len(values)} prompt rows; expected 100 (style, class, prompt)")
      prompts = [str(v[2]).strip() for v in values]
      files.append(prompts_rel)
    index_rel = first_existing(root, self.PIC_INDEX)
    if index_rel:
      for row_no, v in read_xlsx(self, root / index_rel):
        k = row_no - 1
        if k >= n or v[1] is None:
          continue
        m = re.match(r"^(\d+)-\d+\.png$", str(v[1]).strip())
        if not m or int(m.group(1)) != prompt_of[k]:
          raise self.error(root / index_rel, f"row {row_no}", f"{v} does not show prompt {prompt_of[k]:03d}, which "
                           f"{k}.png should show (prompt = (k % 400) // 4)")
      files.append(index_rel)
    rows = []
    for k in range(n):
      content = prompts[prompt_of[k]] if prompts else f"prompt {prompt_of[k]:03d}"
      row = checked_row(self, log, name=f"Image/allimg/{k}.png", mos=float(mos[k]), mos_std=float(std[k]),
                        content_id=content, file=mos_file, row=f"entry {k + 1}")
      if row:
        rows.append(row)
    notes = {"mos_column": "MOSz (quality, mosz1.mat)",
             "content_id_source": prompts_rel or "prompt index (k % 400) // 4 (no prompts xlsx found)"}
    return Listing(rows, files, [("Image/allimg", False)], notes=notes)
