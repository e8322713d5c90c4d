"""Generated backbones and datasets come from plugins (config.plugins), never from the modules every run goes through:
a real run imports no smoke code, a saved smoke run from before `plugins` finds its plugin again, the registries
write a registered backbone / dataset once, and an unknown name is an error listing the registered ones."""

import json
import pathlib
import subprocess
import sys

import data_fakes
import pytest

from configs import base
from mcpf_jax import clip, resolve, runs
from mcpf_jax import data as datasets
from mcpf_jax.clip import tiny
from mcpf_jax.train import data_setup

REPO = pathlib.Path(__file__).resolve().parents[1]
OLD_RUN = REPO / "tests" / "fixtures" / "old_checkpoint"  # a smoke run written before `plugins` existed
SMALL = dict(width=32, layers=2, heads=4, image_size=32, patch_size=8, embed_dim=24)


def test_a_real_run_imports_no_smoke_code_and_an_old_smoke_run_finds_its_plugin():
  code = """
import json, sys
from mcpf_jax import data, export, resolve, runs, scoring
from mcpf_jax.train import data_setup, evaluation, trainer
from configs import base
resolve.resolve(base.get_config("livec"), 1)
real = sorted(m for m in sys.modules if m.startswith("mcpf_jax.smoke"))
config = resolve.saved_config(runs.read_run(sys.argv[1]), {})
print(json.dumps([real, list(config.plugins), sorted(runs.BACKBONES), sorted(data.GENERATED)]))
"""
  out = subprocess.run([sys.executable, "-c", code, str(OLD_RUN)], cwd=REPO, capture_output=True, text=True,
                       check=True)
  real, plugins, backbones, generated = json.loads(out.stdout.strip().splitlines()[-1])
  assert real == []
  assert plugins == ["mcpf_jax.smoke"] and "tiny" in backbones and "smoke" in generated


def test_the_upgrade_adds_plugins_only_where_a_name_needs_one():
  old = json.loads((OLD_RUN / "run.json").read_text())["config"]
  assert "plugins" not in old and runs.upgrade_config(old)["plugins"] == ["mcpf_jax.smoke"]
  assert "plugins" not in runs.upgrade_config({"clip": {"name": "openai/clip-vit-base-patch16"},
                                               "data": {"name": "livec"}})
  assert runs.upgrade_config({"data": {"name": "smoke"}})["plugins"] == ["mcpf_jax.smoke"]
  assert runs.upgrade_config({"clip": {"name": "tiny"}, "plugins": []})["plugins"] == []  # as saved


def test_a_bad_plugin_name_is_refused_naming_it():
  config = base.get_config()
  with config.unlocked():
    config.plugins = ("mcpf_jax.no_such_plugin",)
  with pytest.raises(ValueError, match=r"plugins: cannot import 'mcpf_jax.no_such_plugin'"):
    resolve.resolve(config, 1)
  with config.unlocked():
    config.plugins = ("not a module",)
  with pytest.raises(ValueError, match=r"plugins: 'not a module' is not a module name"):
    resolve.resolve(config, 1)


def test_unknown_names_list_the_registered_ones(tmp_path, monkeypatch):
  never = pytest.fail
  monkeypatch.setitem(runs.BACKBONES, "listed", runs.GeneratedBackbone(recipe=never, write=never, clip_config=never))
  monkeypatch.setitem(datasets.GENERATED, "listed_data", datasets.Generated(csv={}, write_release=never))
  config = base.get_config()
  with config.unlocked():
    config.clip.name = "no such backbone"
  with pytest.raises(FileNotFoundError, match=r"nor is 'no such backbone' a generated backbone \(registered: "
                                              r"\[.*'listed'.*\]; config.plugins=\[\]"):
    runs.load_clip(config, tmp_path)
  with pytest.raises(ValueError, match=r"data.name='nope': not a dataset of mcpf_jax.data \[.*'livec'.*\] nor a "
                                       r"generated one \(registered: \[.*'listed_data'.*\]"):
    data_setup.open_source(config, "nope", tmp_path)


def test_a_registered_backbone_is_written_once_into_the_run_folder(tmp_path, monkeypatch):
  written = []

  def write(folder, **recipe):
    written.append(pathlib.Path(folder).name)
    return tiny.write_tiny_clip(folder, **recipe)

  monkeypatch.setitem(runs.BACKBONES, "small", runs.GeneratedBackbone(
      recipe=lambda c: {"seed": int(c.seed), **SMALL}, write=write, clip_config=tiny.config_of))
  config = base.get_config()
  with config.unlocked():
    config.clip.name, config.seed = "small", 3
  bundle = runs.load_clip(config, tmp_path / "run")
  assert (tmp_path / "run" / "small_clip" / "config.json").is_file()
  assert written[0].startswith(".small_clip.tmp-")  # written aside, then renamed into place
  reference = clip.load(tiny.write_tiny_clip(tmp_path / "reference", seed=3, **SMALL))
  assert bundle.fingerprint == reference.fingerprint and bundle.config.to_hf() == reference.config.to_hf()
  assert runs.load_clip(config, tmp_path / "run").fingerprint == bundle.fingerprint  # the folder is reused
  assert written[1:] == ["small_clip"]
  generated = runs.BACKBONES["small"]
  assert generated.clip_config(generated.recipe(config)).to_hf() == tiny.config_of(SMALL).to_hf()


def test_a_registered_dataset_is_written_and_built_once(tmp_path, monkeypatch):
  names = [f"img{k}.png" for k in range(6)]

  def write_release(folder):
    data_fakes.write_images(folder, names)
    (folder / "mos.csv").write_text("path,mos,content_id\n" + "".join(
        f"{n},{1 + 0.5 * k},c{k // 2}\n" for k, n in enumerate(names)))

  csv = {"csv_path": "mos.csv", "image_column": "path", "mos_column": "mos", "content_column": "content_id",
         "mos_range": (1.0, 5.0)}
  monkeypatch.setitem(datasets.GENERATED, "mini", datasets.Generated(csv=csv, write_release=write_release))
  config = base.get_config()
  with config.unlocked():
    config.data.data_dir = ""  # <workdir>/data
  src = data_setup.open_source(config, "mini", tmp_path)
  assert (tmp_path / "data" / "mini_release" / "mos.csv").is_file()  # the raw release, beside the build
  assert str(src.path).startswith(str(tmp_path / "data" / "csv" / "mini" / ""))
  assert sorted(src.names) == names and sorted(src.mos.tolist()) == [1.0, 1.5, 2.0, 2.5, 3.0, 3.5]

  def never(folder):
    raise AssertionError(f"written again into {folder}")

  monkeypatch.setitem(datasets.GENERATED, "mini", datasets.Generated(csv=csv, write_release=never))
  assert list(data_setup.open_source(config, "mini", tmp_path).names) == list(src.names)
