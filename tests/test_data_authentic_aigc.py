"""SPAQ, the AI-generated releases and a user's csv, from their real label files.

SPAQ's 11125 rows are counted from the real csv and built on a slice (plus the official-xlsx layout on a smaller
slice); AGIQA-1K (1080), AGIQA-3K (2982) and AIGCIQA2023 (2400) are built at full size. AIGCIQA2023's MOS file was
not obtained: its .mat files here are synthetic, in the layout public loaders read (MOSz / SD, 2400x1), so only
the layout, the prompt join and the picture index are checked against real files, not the real scores.
"""

import json
import math
import shutil

import data_fakes
import numpy as np
import openpyxl
import pytest

import mcpf_jax.data as data
from mcpf_jax import classes
from mcpf_jax.data import layouts, problems

SPAQ_SCENES = ("Animal", "Cityscape", "Human", "Indoor scene", "Landscape", "Night scene", "Plant", "Still-life",
               "Others")


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
  path = data_fakes.fast_tmp(tmp_path_factory, "aigc")
  yield path
  shutil.rmtree(path, ignore_errors=True)


def _build(name, root, out, **kwargs):
  data.builder(name, data_dir=out, **kwargs).download_and_prepare(download_config=data_fakes.manual(root))
  return data.source(name, data_dir=out)


def test_spaq_scene_columns_are_liqe_scenes():
  assert [c.lower().replace(" scene", "").replace("-", "_") for c in SPAQ_SCENES] == list(classes.SCENES)


def test_spaq_counts_all_11125_rows(test_data, tmp):
  root = data_fakes.spaq(tmp / "spaq_count", test_data / "labels", images=False)
  listing = layouts.Spaq().read(root, problems.ProblemLog("spaq", False))
  assert len(listing.rows) == 11125
  assert sum(r.scene is not None for r in listing.rows) == 11125


@pytest.mark.parametrize("official_xlsx", [False, True])
def test_spaq_slice(test_data, tmp, official_xlsx):
  sub = tmp / f"spaq_{official_xlsx}"
  root = data_fakes.spaq(sub, test_data / "labels", select=slice(5, None, 97 if official_xlsx else 23),
                         official_xlsx=official_xlsx)
  src = _build("spaq", root, sub / "tfds", decode_check="full" if official_xlsx else "verify")
  rows = data_fakes.read_csv(test_data / "labels" / "spaq" / "meta_info_SPAQDataset.csv")
  rows = rows[5::97 if official_xlsx else 23]
  assert len(src) == len(rows)
  for i, r in enumerate(rows):
    rec = src[i]
    assert rec["name"] == f"TestImage/{r['Image name']}" == rec["content_id"]
    assert rec["mos"] == np.float32(r["MOS"]) and math.isnan(rec["mos_std"])
    # SPAQ's own scene labels (fractions 1/k over its 9 categories, LIQE's 9 scenes): present where > 0.
    np.testing.assert_array_equal(rec["scene"], [float(r[c]) > 0 for c in SPAQ_SCENES])
    assert rec["has_scene"] and not rec["has_distortion"]
  assert src.metadata["notes"]["label_file"] == (
      "Annotations/MOS and Image attribute scores.xlsx" if official_xlsx else "meta_info_SPAQDataset.csv")


def test_agiqa1k_1080_rows_one_conflicting_duplicate(test_data, tmp):
  # The official AIGC_MOS_Zscore.xlsx has 1080 rows but names dreamStudio_8_9_1_1.jpg twice (rows 1080 and 1081,
  # scores 0.44 and 2.08): by default that is an error; skip_bad drops both rows and reports them.
  root = data_fakes.agiqa1k(tmp, test_data / "labels")
  ws = openpyxl.load_workbook(test_data / "labels" / "agiqa1k" / "AIGC_MOS_Zscore.xlsx", read_only=True).active
  rows = list(ws.iter_rows(min_row=2, values_only=True))
  assert len(rows) == 1080 and len({r[0] for r in rows}) == 1079
  listing = layouts.Agiqa1k().read(root, problems.ProblemLog("agiqa1k", False))
  assert len(listing.rows) == 1080
  with pytest.raises(problems.DatasetError, match=r"dataset agiqa1k: AIGC_MOS_Zscore.xlsx, row 1080: "
                     r"file/dreamStudio_8_9_1_1.jpg is named by several rows with different labels"):
    data.builder("agiqa1k", data_dir=tmp / "agiqa1k_strict").download_and_prepare(
        download_config=data_fakes.manual(root))
  src = _build("agiqa1k", root, tmp / "agiqa1k_tfds", skip_bad=True, report_path=str(tmp / "agiqa1k_report.json"))
  kept = [r for r in rows if r[0] != "dreamStudio_8_9_1_1.jpg"]
  assert len(src) == len(kept) == 1078
  for i, (name, prompt, mos) in enumerate(kept):
    rec = src[i]
    assert rec["name"] == f"file/{name}" and rec["content_id"] == prompt and rec["mos"] == np.float32(mos)
  assert src[3]["image"] == (root / src[3]["name"]).read_bytes()
  assert src.metadata["content_kind"] == "prompt" and src.metadata["notes"]["image_dir"] == "file"
  assert src.metadata["num_contents"] == len({r[1] for r in kept})
  report = json.loads((tmp / "agiqa1k_report.json").read_text())
  assert report["skipped"] == 2 and report["counts"]["duplicate_label_row"] == 2
  assert [p["row"] for p in report["problems"]] == ["row 1080", "row 1081"]
  assert src.metadata["skipped"] == 2 and src.metadata["skip_report"] == str(tmp / "agiqa1k_report.json")


def test_agiqa3k_2982(test_data, tmp):
  root = data_fakes.agiqa3k(tmp, test_data / "labels")
  src = _build("agiqa3k", root, tmp / "agiqa3k_tfds", decode_check="verify")
  rows = data_fakes.read_csv(test_data / "labels" / "agiqa3k" / "data.csv")
  assert len(src) == len(rows) == 2982
  np.testing.assert_array_equal(src.mos, np.float32([float(r["mos_quality"]) for r in rows]))
  assert list(src.content_ids) == [r["prompt"] for r in rows]
  for i in range(0, 2982, 101):
    rec = src[i]
    assert rec["name"] == rows[i]["name"] and rec["mos_std"] == np.float32(rows[i]["std_quality"])
  assert src.metadata["num_contents"] == 300


def test_aigciqa2023_2400(test_data, tmp):
  root, mos = data_fakes.aigciqa2023(tmp, test_data / "labels")
  src = _build("aigciqa2023", root, tmp / "aigciqa2023_tfds", decode_check="verify")
  prompts = [r[2] for r in openpyxl.load_workbook(root / "AIGCIQA2023_Prompts.xlsx").active.iter_rows(
      values_only=True)]
  assert len(src) == 2400 and len(prompts) == 100
  assert list(src.names) == [f"Image/allimg/{k}.png" for k in range(2400)]
  np.testing.assert_array_equal(src.mos, mos.astype(np.float32))
  # Content ids are the prompts with surrounding whitespace stripped (one prompt ends with a space).
  assert list(src.content_ids) == [prompts[(k % 400) // 4].strip() for k in range(2400)]
  assert src[17]["mos_std"] == np.float32(mos[17] / 10)
  meta = src.metadata
  assert meta["num_contents"] == 100 and meta["mos_range_source"] == "observed"
  assert "pic-index.xlsx" in meta["label_files"]


def test_aigciqa2023_picture_index_mismatch_is_an_error(test_data, tmp):
  root, _ = data_fakes.aigciqa2023(tmp / "aigc_bad", test_data / "labels")
  wb = openpyxl.load_workbook(root / "pic-index.xlsx")
  wb.active.cell(row=9, column=2).value = "005-1.png"  # image 8.png shows prompt 002
  wb.save(root / "pic-index.xlsx")
  with pytest.raises(problems.DatasetError, match=r"pic-index.xlsx, row 9: .*should show"):
    layouts.Aigciqa2023().read(root, problems.ProblemLog("aigciqa2023", False))


def test_user_csv(tmp):
  root = tmp / "mine"
  names = ["a/x1.png", "a/x2.jpg", "b/y1.bmp", "b/y2.png"]
  data_fakes.write_images(root / "pics", names)
  (root / "scores.tsv").write_text("file\tscore\tsd\tsrc\tpart\n" + "".join(
      f"{n}\t{k + 0.5}\t{0.1 * k}\t{n.split('/')[0]}\t{'test' if k == 3 else 'train'}\n" for k, n in enumerate(names)))
  b = data.builder("csv", data_dir=tmp / "mine_tfds", config_name="mine", csv_path="scores.tsv", image_column="file",
                   mos_column="score", std_column="sd", content_column="src", split_column="part", delimiter="\t",
                   image_root="pics", higher_is_better=False, mos_range=(0.0, 10.0))
  b.download_and_prepare(download_config=data_fakes.manual(root))
  src = data.source("csv", data_dir=tmp / "mine_tfds", config="mine")
  assert len(src) == 4
  assert list(src.names) == [f"pics/{n}" for n in names]
  np.testing.assert_array_equal(src.mos, np.float32([0.5, 1.5, 2.5, 3.5]))
  assert list(src.content_ids) == ["a", "a", "b", "b"]
  assert src[2]["image"] == (root / "pics" / names[2]).read_bytes()
  assert src[1]["mos_std"] == np.float32(0.1)
  meta = src.metadata
  assert meta["higher_is_better"] is False and meta["mos_range"] == [0.0, 10.0] and meta["content_kind"] == "custom"
  assert meta["official_splits"] == {"train": 3, "test": 1}
  assert len(data.source("csv", data_dir=tmp / "mine_tfds", config="mine", part="test")) == 1
