"""Every config in configs/ loads the way train.py loads it, builds a valid model spec and optimizer, and has every
field the training code reads (found by reading that code)."""

import inspect
import pathlib
import re

import pytest
from absl import flags
from ml_collections import ConfigDict, config_flags

from mcpf_jax import data as datasets
from mcpf_jax.clip import tiny
from mcpf_jax.clip.config import from_name
from mcpf_jax.model import freeze
from mcpf_jax.model.iqa import ModelSpec
from mcpf_jax.train import optim, restore

# ml_collections' config_flags loads a config file with importlib's deprecated SourceFileLoader.load_module() (in
# 1.1.0, its latest release, as train.py loads it: the thing tested here), once per load. The warning is raised
# from importlib's frozen bootstrap, not ml_collections, so it is matched by its text; nothing else is hidden.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:the load_module\(\) method is deprecated and slated for removal:DeprecationWarning")

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.py") if not p.stem.startswith("_"))
# Kept by hand, not derived from data.NAMES: it is the promise that these datasets have a training config (agiqa1k,
# aigciqa2023 and csv have none); test_a_config_per_dataset checks each is a known dataset with its config file.
DATASETS = ("livec", "koniq10k", "spaq", "live", "csiq", "tid2013", "kadid10k", "agiqa3k")
# Where the training, evaluation and protocol code reads the config.
READERS = ("train/trainer.py", "train/build.py", "train/evaluation.py", "train/data_setup.py", "train/protocol.py",
           "train/restore.py", "runs.py")  # runs.py: the run's CLIP (clip.*), read for training and inference alike
# Read only for clip.name == "tiny" (the smoke config's random CLIP).
TINY_ONLY = {"clip.tiny", "clip.tiny_seed"}


def _load(name: str, *overrides: str):
  """The config as train.py gets it: --config=configs/<name>.py plus --config.a.b=v overrides."""
  argv = ["train.py", f"--config={REPO / 'configs' / (name + '.py')}", *overrides]
  fv = flags.FlagValues()
  # sys_argv: the overrides are read from this argv (by default config_flags reads sys.argv).
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.config


def _fields_read() -> set[str]:
  """Dotted config fields the training code reads: `config.block.field` / `cfg.block.field` in READERS, the
  `optim` block's fields read by optim.py (`config.lr`, ...), and the loss weights the trainer collects."""
  blocks = {k for k, v in _load("base").items() if hasattr(v, "keys")}
  top = {k for k, v in _load("base").items() if not hasattr(v, "keys")}
  fields = set()
  for name in READERS:
    text = (REPO / "mcpf_jax" / name).read_text()
    for block, field in re.findall(r"\b(?:cfg|config)\.([a-z_]+)\.([a-z_]+)\b", text):
      if block in blocks and not hasattr(ConfigDict, field):  # not a method (copy_and_resolve_references)
        fields.add(f"{block}.{field}")
    fields.update(k for k in re.findall(r"\b(?:cfg|config)\.([a-z_]+)\b(?!\.)", text) if k in top)
  # The functions of optim.py that take the `optim` block as `config`.
  optim_text = inspect.getsource(optim.learning_rate_schedule) + inspect.getsource(optim.make_optimizer)
  fields.update(f"optim.{f}" for f in re.findall(r"\bconfig\.([a-z_0-9]+)\b", optim_text))
  fields.update(f"loss.{k}" for k in ("rank", "l1", "cls", "aux"))
  return fields - TINY_ONLY


def _get(config, dotted: str):
  value = config
  for part in dotted.split("."):
    value = value[part]  # KeyError names the missing field
  return value


def test_a_config_per_dataset():
  assert set(DATASETS) <= set(datasets.NAMES)
  assert set(DATASETS) <= set(CONFIGS)
  assert {"base", "smoke"} <= set(CONFIGS)


def test_the_fields_read_are_found():
  """The scan finds what it should (so a config missing any of these would fail below)."""
  fields = _fields_read()
  for f in ("train.batch_size", "train.checkpoint_every", "train.keep", "data.resize", "data.split_protocol",
            "eval.num_crops", "mesh.data", "optim.lr", "optim.warmup_steps", "optim.grad_clip_norm", "clip.name",
            "model.trainable", "seed", "num_splits"):
    assert f in fields, f


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds(name):
  config = _load(name)
  for field in sorted(_fields_read()):
    _get(config, field)
  if name in DATASETS:
    assert config.data.name == name
  assert config.data.name in datasets.NAMES or config.data.name == "smoke"
  # The model spec, with the backbone's depth (no weights read).
  clip = tiny.config_of(config.clip.tiny) if config.clip.name == "tiny" else from_name(config.clip.name)
  spec = ModelSpec.from_config(config.model, num_layers=min(clip.text.num_hidden_layers,
                                                            clip.vision.num_hidden_layers))
  assert spec.name == config.model.name
  # The optimizer over a tree with a backbone and prompts.
  tree = {"clip": {"w": 0.0}, "text_prompts_quality": 0.0}
  mask = freeze.mask(tree, config.model.trainable)
  optim.make_optimizer(restore.optim_config(config, steps_per_epoch=10), mask)
  # Sizes the pipeline and the mesh accept.
  image_size = config.data.image_size or clip.vision.image_size
  assert config.data.resize >= image_size
  assert config.train.batch_size % config.train.accumulate_steps == 0
  assert config.train.checkpoint_every > 0 and config.train.keep > 0 and config.eval.num_crops > 0
  assert config.eval.checkpoint in ("best", "latest") or int(config.eval.checkpoint) >= 0
  assert config.data.split_protocol in ("seed", "official")
  if config.data.split_protocol == "official":
    assert datasets.info(config.data.name)["official_split_names"]


def test_koniq_official_split_from_the_command_line():
  config = _load("koniq10k", "--config.data.split_protocol=official", "--config.num_splits=10")
  assert config.data.split_protocol == "official" and config.num_splits == 10
  assert set(datasets.info("koniq10k")["official_split_names"]) == {"training", "validation", "test"}


def test_unknown_override_is_refused():
  with pytest.raises(Exception, match="no_such_field"):
    _load("livec", "--config.data.no_such_field=1")
