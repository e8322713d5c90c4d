"""Bad input: every kind of bad row is an error naming the dataset, the file and the row, or (skip_bad) a skipped row
in a written report; a wrong folder is an error that says what was expected there."""

import json
import math
import pathlib
import sys

import data_fakes
import numpy as np
import pytest
import scipy.io

import mcpf_jax.data as data
from mcpf_jax.data import prepare, problems

NAMES = ("t1.bmp", "10.bmp", "11.JPG", "12.bmp", "13.JPG")


def mini_clive(root: pathlib.Path, names=NAMES, mos=None, std=None) -> pathlib.Path:
  """A CLIVE release in the official layout (.mat files as in ChallengeDB_release) with tiny images."""
  mos = [10.0 * (k + 1) for k in range(len(names))] if mos is None else mos
  std = [1.0 + k for k in range(len(names))] if std is None else std
  (root / "Data").mkdir(parents=True)
  cell = np.empty((len(names), 1), dtype=object)
  for k, n in enumerate(names):
    cell[k, 0] = np.array([n])
  scipy.io.savemat(root / "Data" / "AllImages_release.mat", {"AllImages_release": cell})
  scipy.io.savemat(root / "Data" / "AllMOS_release.mat", {"AllMOS_release": np.array([mos], float)})
  scipy.io.savemat(root / "Data" / "AllStdDev_release.mat", {"AllStdDev_release": np.array([std], float)})
  data_fakes.write_images(root, [f"Images/trainingImages/{n}" if n.startswith("t") else f"Images/{n}" for n in names])
  return root


def build(name, root, out, **kwargs):
  b = data.builder(name, data_dir=out, **kwargs)
  b.download_and_prepare(download_config=data_fakes.manual(root))
  return b


def test_good_mini_release_builds(tmp_path):
  root = mini_clive(tmp_path / "ChallengeDB_release")
  build("livec", root, tmp_path / "out")
  src = data.source("livec", data_dir=tmp_path / "out")
  assert list(src.names) == ["Images/10.bmp", "Images/11.JPG", "Images/12.bmp", "Images/13.JPG"]
  np.testing.assert_array_equal(src.mos, np.float32([20, 30, 40, 50]))


def test_missing_image(tmp_path):
  root = mini_clive(tmp_path / "rel")
  (root / "Images" / "12.bmp").unlink()
  with pytest.raises(problems.DatasetError, match=r"^dataset livec: Data/AllImages_release.mat, entry 4: image file "
                     r"Images/12.bmp not found in .*skip_bad"):
    build("livec", root, tmp_path / "out")
  report = tmp_path / "report.json"
  b = build("livec", root, tmp_path / "out2", skip_bad=True, report_path=str(report))
  assert b.info.splits["full"].num_examples == 3
  got = json.loads(report.read_text())
  assert got["dataset"] == "livec" and got["skipped"] == 1 and got["num_examples"] == 3
  assert got["problems"] == [{"kind": "missing_image", "file": "Data/AllImages_release.mat", "row": "entry 4",
                              "name": "Images/12.bmp", "detail": got["problems"][0]["detail"]}]
  assert data.info("livec", data_dir=tmp_path / "out2")["problems"] == got["problems"]


def test_label_row_without_image_name(tmp_path):
  root = tmp_path / "kadid10k"
  data_fakes.write_images(root, ["images/I01_01_01.png", "images/I01_01_02.png", "images/I01.png"])
  (root / "dmos.csv").write_text("dist_img,ref_img,dmos,var\nI01_01_01.png,I01.png,4.57,0.496\n"
                                 ",I01.png,4.33,0.869\nI01_01_02.png,I01.png,4.1,0.5\n")
  with pytest.raises(problems.DatasetError, match=r"^dataset kadid10k: dmos.csv, line 3: label row without an image "
                     "name"):
    build("kadid10k", root, tmp_path / "out")
  b = build("kadid10k", root, tmp_path / "out2", skip_bad=True, report_path=str(tmp_path / "r.json"))
  assert b.info.splits["full"].num_examples == 2
  assert json.loads((tmp_path / "r.json").read_text())["counts"]["label_row_without_image_name"] == 1


def test_image_without_label_row(tmp_path):
  root = mini_clive(tmp_path / "rel")
  data_fakes.write_images(root, ["Images/999.bmp"])
  (root / "Images" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # not an image: not counted
  (root / "Images" / "notes.txt").write_text("not an image")
  with pytest.raises(problems.DatasetError, match=r"^dataset livec: Images/999.bmp: image file Images/999.bmp is in "
                     r"Images/ but no row of Data/AllImages_release.mat.* names it"):
    build("livec", root, tmp_path / "out")
  build("livec", root, tmp_path / "out2", skip_bad=True)
  meta = data.info("livec", data_dir=tmp_path / "out2")
  assert meta["num_examples"] == 4
  assert [(p["kind"], p["name"]) for p in meta["problems"]] == [("image_without_label_row", "Images/999.bmp")]
  # The default report path is beside the dataset folder.
  default_report = tmp_path / "out2" / "livec-skip-report.json"
  assert meta["skip_report"] == str(default_report) and json.loads(default_report.read_text())["skipped"] == 1


@pytest.mark.parametrize("content", [b"", b"this is not an image", "truncated"])
def test_undecodable_image(tmp_path, content):
  root = mini_clive(tmp_path / "rel")
  path = root / "Images" / "11.JPG"
  path.write_bytes(path.read_bytes()[:40] if content == "truncated" else content)
  with pytest.raises(problems.DatasetError, match=r"^dataset livec: Data/AllImages_release.mat, entry 3: image file "
                     r"Images/11.JPG does not decode"):
    build("livec", root, tmp_path / "out")
  b = build("livec", root, tmp_path / "out2", skip_bad=True)
  assert b.info.splits["full"].num_examples == 3
  assert b.info.metadata["problems"][0]["kind"] == "undecodable_image"
  # Without the decode check the file is built as it is (its bytes, untouched).
  build("livec", root, tmp_path / "out3", decode_check="none")
  src = data.source("livec", data_dir=tmp_path / "out3")
  assert src[1]["image"] == path.read_bytes()


def test_nan_mos_in_mat(tmp_path):
  root = mini_clive(tmp_path / "rel", mos=[1.0, 2.0, math.nan, 4.0, 5.0])
  with pytest.raises(problems.DatasetError, match=r"^dataset livec: Data/AllMOS_release.mat, entry 3: score of "
                     r"Images/11.JPG is NaN"):
    build("livec", root, tmp_path / "out")
  b = build("livec", root, tmp_path / "out2", skip_bad=True)
  assert b.info.splits["full"].num_examples == 3
  # The skipped row's image is not also reported as an image without a label row.
  assert [p["kind"] for p in b.info.metadata["problems"]] == ["nan_mos"]


@pytest.mark.parametrize("value", ["nan", "", "n/a"])
def test_nan_mos_in_csv(tmp_path, value):
  root = tmp_path / "kadid10k"
  data_fakes.write_images(root, ["images/I01_01_01.png", "images/I01_01_02.png", "images/I01.png"])
  (root / "dmos.csv").write_text(f"dist_img,ref_img,dmos,var\nI01_01_01.png,I01.png,4.57,0.496\n"
                                 f"I01_01_02.png,I01.png,{value},0.5\n")
  with pytest.raises(problems.DatasetError, match=r"dmos.csv, line 3: score of images/I01_01_02.png is NaN, empty"):
    build("kadid10k", root, tmp_path / "out")


def test_duplicate_rows(tmp_path):
  root = tmp_path / "kadid10k"
  data_fakes.write_images(root, ["images/I01_01_01.png", "images/I01_01_02.png", "images/I01.png"])
  (root / "dmos.csv").write_text("dist_img,ref_img,dmos,var\nI01_01_01.png,I01.png,4.57,0.496\n"
                                 "I01_01_02.png,I01.png,4.1,0.5\nI01_01_01.png,I01.png,4.57,0.496\n")
  with pytest.raises(problems.DatasetError, match=r"dmos.csv, line 4: images/I01_01_01.png is named by several rows "
                     r"with the same labels"):
    build("kadid10k", root, tmp_path / "out")
  b = build("kadid10k", root, tmp_path / "out2", skip_bad=True)
  assert b.info.splits["full"].num_examples == 2  # identical repeats keep the first row


def test_mat_length_mismatch(tmp_path):
  root = mini_clive(tmp_path / "rel")
  scipy.io.savemat(root / "Data" / "AllStdDev_release.mat", {"AllStdDev_release": np.ones((1, 4))})
  with pytest.raises(problems.DatasetError, match=r"the .mat files disagree in length: 5 names, 5 MOS, 4 std"):
    build("livec", root, tmp_path / "out", skip_bad=True)  # structural errors are never skipped


def test_wrong_folder_parent(tmp_path):
  root = mini_clive(tmp_path / "downloads" / "ChallengeDB_release")
  with pytest.raises(problems.DatasetError) as e:
    build("livec", tmp_path / "downloads", tmp_path / "out")
  msg = str(e.value)
  assert "expected Data/AllImages_release.mat, Data/AllMOS_release.mat, Data/AllStdDev_release.mat and Images/" in msg
  assert f"in {tmp_path / 'downloads'}" in msg and "found [ChallengeDB_release/]" in msg
  assert f"did you mean {root}?" in msg


def test_wrong_folder_other_dataset(tmp_path):
  root = mini_clive(tmp_path / "ChallengeDB_release")
  with pytest.raises(problems.DatasetError) as e:
    build("koniq10k", root, tmp_path / "out")
  msg = str(e.value)
  assert msg.startswith("dataset koniq10k:") and "koniq10k_scores_and_distributions.csv" in msg
  assert "this folder looks like the livec release" in msg


def test_wrong_folder_missing(tmp_path):
  with pytest.raises(problems.DatasetError, match="does not exist"):
    build("tid2013", tmp_path / "nowhere", tmp_path / "out")


def test_bad_liqe_files(tmp_path):
  root = mini_clive(tmp_path / "rel")
  liqe = tmp_path / "liqe" / "ChallengeDB_release" / "splits2" / "1"
  liqe.mkdir(parents=True)
  (liqe / "clive_test_clip.txt").write_text("Images/10.bmp\t50\tblurry\tanimal\tinvalid\tinvalid\n")
  with pytest.raises(problems.DatasetError,
                     match=r"clive_test_clip.txt, line 1: unknown LIQE distortion name 'blurry'"):
    build("livec", root, tmp_path / "out", liqe_dir=str(tmp_path / "liqe"))
  (tmp_path / "other_liqe" / "koniq-10k").mkdir(parents=True)
  with pytest.raises(problems.DatasetError, match=r"no LIQE split folder ChallengeDB_release/ in liqe_dir"):
    build("livec", root, tmp_path / "out2", liqe_dir=str(tmp_path / "other_liqe"))


def test_prepare_cli_skip_bad_reports(tmp_path, capsys):
  root = mini_clive(tmp_path / "rel")
  (root / "Images" / "10.bmp").unlink()
  report = tmp_path / "skipped.json"
  assert prepare.main(["livec", "--manual_dir", str(root), "--data_dir", str(tmp_path / "out"), "--skip_bad",
                       "--report", str(report)]) == 0
  out = capsys.readouterr().out.splitlines()
  assert len(out) == 1
  summary = json.loads(out[0])
  assert summary == {"dataset": "livec", "config": None, "num_examples": 3,
                     "data_dir": str(tmp_path / "out" / "livec" / "1.0.0"), "skipped": 1, "report": str(report)}
  assert json.loads(report.read_text())["problems"][0]["name"] == "Images/10.bmp"
  # A second run reuses the built dataset; --overwrite rebuilds it (here: now without the bad row).
  data_fakes.write_images(root, ["Images/10.bmp"])
  assert prepare.main(["livec", "--manual_dir", str(root), "--data_dir", str(tmp_path / "out")]) == 0
  assert json.loads(capsys.readouterr().out)["num_examples"] == 3
  assert prepare.main(["livec", "--manual_dir", str(root), "--data_dir", str(tmp_path / "out"), "--overwrite"]) == 0
  assert json.loads(capsys.readouterr().out)["num_examples"] == 4
  assert prepare.main(["livec", "--manual_dir", str(tmp_path), "--data_dir", str(tmp_path / "out3")]) == 1
  captured = capsys.readouterr()
  assert captured.out == "" and "did you mean" in captured.err


# Label files from others: an image path outside the release folder is refused before anything is read.

_OPENED: list[str] | None = None  # the paths Python opens while a test listens (audit hook below), else None


def _audit(event, args):
  if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, pathlib.Path)):
    _OPENED.append(str(args[0] if not isinstance(args[0], bytes) else args[0].decode()))


sys.addaudithook(_audit)  # real `open` events (PIL and pathlib open through them); cannot be removed, so gated


def _outside_release(tmp_path, how):
  """A csv release in `rel/` whose second row names a secret file outside `rel/`, in the way `how` says."""
  root = tmp_path / "rel"
  data_fakes.write_images(root, ["a.png", "b.png"])
  secret = tmp_path / "outside" / "passwd"
  secret.parent.mkdir()
  secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
  if how == "symlink":
    (root / "link").symlink_to(secret.parent, target_is_directory=True)
    name = "link/passwd"
  else:
    name = {"relative": "../outside/passwd", "deep": "../" * 12 + str(secret).lstrip("/"),
            "absolute": str(secret)}[how]
  (root / "mos.csv").write_text(f"image,mos\na.png,1.0\n{name},2.0\nb.png,3.0\n")
  return root, secret, name


@pytest.mark.parametrize("how", ["relative", "deep", "absolute", "symlink"])
def test_csv_row_outside_the_release_folder_is_refused_before_any_read(tmp_path, how):
  global _OPENED
  root, _, name = _outside_release(tmp_path, how)
  _OPENED = []
  try:
    with pytest.raises(problems.DatasetError) as e:
      build("csv", root, tmp_path / "out", config=data.CsvConfig(name="mine", csv_path="mos.csv"))
    opened = list(_OPENED)
  finally:
    _OPENED = None
  message = str(e.value)
  assert message.startswith(f"dataset csv: mos.csv, line 3: image path {name!r} ")
  assert "inside the release folder" in message and "--allow_outside_paths" in message
  assert "root:x" not in message  # nothing of the file's content
  assert any(p.endswith("mos.csv") for p in opened), opened  # the hook hears the builder's opens
  assert not any(p.endswith("passwd") for p in opened), opened  # the file was never opened
  assert not any(p.endswith((".png", ".bmp")) for p in opened), opened  # nor any image: it stops before reading
  # skip_bad does not turn it into a skipped row: a label file that reaches out is refused as a whole.
  with pytest.raises(problems.DatasetError, match="inside the release folder"):
    build("csv", root, tmp_path / "out2", config=data.CsvConfig(name="mine", csv_path="mos.csv"), skip_bad=True)


def test_official_layout_row_outside_the_release_folder_is_refused(tmp_path):
  root = tmp_path / "kadid10k"
  data_fakes.write_images(root, ["images/I01_01_01.png", "images/I01.png"])
  data_fakes.write_images(tmp_path, ["elsewhere/I01_01_02.png"])
  (root / "dmos.csv").write_text("dist_img,ref_img,dmos,var\nI01_01_01.png,I01.png,4.57,0.496\n"
                                 "../../elsewhere/I01_01_02.png,I01.png,4.1,0.5\n")
  with pytest.raises(problems.DatasetError, match=r"^dataset kadid10k: dmos.csv, line 3: image path "
                     r"'images/../../elsewhere/I01_01_02.png' leads out of it with '..'"):
    build("kadid10k", root, tmp_path / "out")


def test_outside_paths_opt_in_builds_and_is_recorded(tmp_path, capsys):
  root, *_ = _outside_release(tmp_path, "relative")
  data_fakes.write_images(tmp_path, ["outside/c.png"])
  (root / "mos.csv").write_text("image,mos\na.png,1.0\n../outside/c.png,2.0\nb.png,3.0\n")
  base = ["csv", "--manual_dir", str(root), "--csv_path", "mos.csv", "--config_name", "mine"]
  assert prepare.main(base + ["--data_dir", str(tmp_path / "refused")]) == 1
  err = capsys.readouterr().err
  assert "'../outside/c.png' leads out of it with '..'" in err and "--allow_outside_paths" in err
  assert not list((tmp_path / "refused").rglob("*.array_record*"))
  assert prepare.main(base + ["--data_dir", str(tmp_path / "out"), "--allow_outside_paths"]) == 0
  assert json.loads(capsys.readouterr().out)["num_examples"] == 3
  src = data.source("csv", data_dir=tmp_path / "out", config="mine")
  assert list(src.names) == ["a.png", "../outside/c.png", "b.png"]
  assert src.metadata["allow_outside_paths"] is True and src.metadata["outside_paths"] == 1
  assert src[1]["image"] == (tmp_path / "outside" / "c.png").read_bytes()


def test_undecodable_message_names_size_and_type_never_content(tmp_path):
  root = mini_clive(tmp_path / "rel")
  (root / "Images" / "11.JPG").write_text("root:x:0:0:root:/root:/bin/bash\n")
  (root / "Images" / "12.bmp").write_bytes(b"%PDF-1.4\n%secret\n")
  b = build("livec", root, tmp_path / "out", skip_bad=True)
  details = [p["detail"] for p in b.info.metadata["problems"]]
  assert details == [
      "image file Images/11.JPG does not decode: ImageDecodeError: Images/11.JPG: cannot decode image: not an "
      "image format PIL can read (32 bytes, detected type: text)",
      "image file Images/12.bmp does not decode: ImageDecodeError: Images/12.bmp: cannot decode image: not an "
      "image format PIL can read (17 bytes, detected type: Adobe Portable Document Format file (application/pdf))"]
