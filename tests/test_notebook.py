"""notebooks/colab_tpu.ipynb: its code cells run end to end on CPU, as Colab would run them on a TPU.

The cells are executed in order in one namespace (as a kernel would), with the parameters cell's values
replaced: the smoke config (tiny CLIP), the LIVE Challenge miniature of tests/data as the "mounted" release
folder, and a temporary Drive stand-in. Nothing is mocked: the dataset is prepared, trained on, evaluated and
its images scored.
"""

import json
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "colab_tpu.ipynb"
PARAMETERS = ("REPO_URL", "REPO_DIR", "CONFIG", "DATASET", "MANUAL_DIR", "DATA_DIR", "WORKDIR", "OVERRIDES",
              "SCORE_PATHS", "JAX_PACKAGE")


def _code_cells() -> list[tuple[str, list[str]]]:
  nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
  assert nb["nbformat"] == 4
  return [("".join(c["source"]), c.get("metadata", {}).get("tags", [])) for c in nb["cells"]
          if c["cell_type"] == "code"]


def test_notebook_is_clean_and_parameterised():
  nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
  assert nb["metadata"]["accelerator"] == "TPU"
  assert any(c["cell_type"] == "markdown" for c in nb["cells"])
  for c in nb["cells"]:
    if c["cell_type"] == "code":
      assert c["outputs"] == [] and c["execution_count"] is None, "commit the notebook without outputs"
  cells = _code_cells()
  params = [src for src, tags in cells if "parameters" in tags]
  assert len(params) == 1
  namespace = {}
  exec(compile(params[0], "parameters cell", "exec"), namespace)  # pylint: disable=exec-used
  assert set(PARAMETERS) <= set(namespace)
  for i, (src, _) in enumerate(cells):
    compile(src, f"code cell {i}", "exec")  # plain Python: no IPython magics (they would not run here)
  colab_only = [src for src, _ in cells if "drive.mount(" in src or '"pip", "install"' in src]
  assert colab_only and all("if IN_COLAB:" in src for src in colab_only)


@pytest.mark.slow
def test_notebook_runs_end_to_end_on_cpu(test_data, tmp_path, monkeypatch):
  overrides = {
      "REPO_DIR": str(REPO),
      "CONFIG": "configs/smoke.py",
      "DATASET": "livec",
      "MANUAL_DIR": str(test_data / "clive-mini" / "ChallengeDB_release"),
      "DATA_DIR": str(tmp_path / "drive" / "tfds"),
      "WORKDIR": str(tmp_path / "drive" / "runs" / "livec"),
      "OVERRIDES": {"train.num_epochs": 1, "eval.num_crops": 3},
      "SCORE_PATHS": [],
  }
  monkeypatch.chdir(tmp_path)  # the notebook changes directory; restored afterwards
  monkeypatch.setattr(sys, "path", list(sys.path))
  namespace = {"__name__": "__main__"}
  for i, (src, tags) in enumerate(_code_cells()):
    exec(compile(src, f"{NOTEBOOK.name} code cell {i}", "exec"), namespace)  # pylint: disable=exec-used
    if "parameters" in tags:
      namespace.update(overrides)
  assert namespace["IN_COLAB"] is False
  workdir = pathlib.Path(overrides["WORKDIR"])
  summary, result = namespace["summary"], namespace["result"]
  assert summary["test"]["dataset"] == "livec" and summary["test"]["num_images"] >= 5
  assert result["dataset"] == "livec" and result["part"] == "test"
  assert result["num_images"] == summary["test"]["num_images"]
  for name in ("eval.json", "eval_predictions.csv", "eval_scatter.png"):
    assert (workdir / name).is_file(), name
  assert (pathlib.Path(overrides["DATA_DIR"]) / "livec").is_dir()
  results = namespace["results"]
  assert len(results) == 8 and all(r.ok for r in results), [r.error for r in results if not r.ok]
  assert namespace["scorer"].info["trained_on"] == "livec"
