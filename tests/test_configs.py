"""Every config in configs/ loads the way train.py loads it, matches the config schema (mcpf_jax/config_schema.py)
and builds a valid model spec and optimizer; every config field the code reads is declared in the schema (found by
parsing the source of the package, the commands and the benchmarks)."""

import ast
import collections
import pathlib

import pytest
from absl import flags
from ml_collections import ConfigDict, config_flags

import mcpf_jax.smoke  # noqa: F401  (the smoke plugin declares clip.tiny and clip.tiny_seed, which its code reads)
from configs import base
from mcpf_jax import config_schema, resolve
from mcpf_jax import data as datasets
from mcpf_jax.clip import tiny
from mcpf_jax.clip.config import from_name
from mcpf_jax.model import freeze
from mcpf_jax.model.iqa import ModelSpec
from mcpf_jax.train import optim

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


def _load(spec: str, *overrides: str):
  """The config as train.py gets it: --config=configs/<spec> (`name.py` or `name.py:argument`) plus --config.a.b=v
  overrides."""
  argv = ["train.py", f"--config={REPO / 'configs' / spec}", *overrides]
  fv = flags.FlagValues()
  # sys_argv: the overrides are read from this argv (by default config_flags reads sys.argv).
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.config


# What the code reads: `config.block.field` / `cfg.block.field` (also `self.config...`, `run.config...`). A name
# `config` is the run's config in a function where one of its reads is a block or top-level field of the schema
# (CLIP's configs, also called `config`, have none); it is one block (optim.py's functions take `config.optim` as
# `config`) where most of its reads are that block's fields. Everything else it reads there must be declared.
ROOTS = ("config", "cfg")
SOURCES = ("mcpf_jax", "benchmarks", "train.py", "eval.py", "score.py")
_METHODS = frozenset(dir(ConfigDict))
_DECLARED = (*config_schema.FIELDS, *config_schema.OPTIONAL)
_TOP = {k for k in _DECLARED if "." not in k}
_BLOCK_FIELDS = collections.defaultdict(set)
for _k in _DECLARED:
  if "." in _k:
    _BLOCK_FIELDS[_k.split(".")[0]].add(_k.split(".", 1)[1])


def _chain(node: ast.Attribute) -> tuple[str, list[str]] | None:
  """`config.a.b` -> ("config", ["a", "b"]), `self.config.a` -> ("self.config", ["a"]); None for other chains."""
  names = []
  while isinstance(node, ast.Attribute):
    names.append(node.attr)
    node = node.value
    if isinstance(node, ast.Name) and node.id in ROOTS:
      return node.id, names[::-1]
    if isinstance(node, ast.Attribute) and node.attr in ROOTS:
      return ast.unparse(node), names[::-1]
  return None


def config_reads(source: str, where: str) -> dict[str, set[str]]:
  """{dotted config field: {"file:line", ...}} for every read of the run config (or one of its blocks) in `source`."""
  by_scope = collections.defaultdict(list)  # (function node, root) -> [(line, names)]

  def visit(node, scope):
    for child in ast.iter_child_nodes(node):
      inner = child if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) else scope
      if isinstance(child, ast.Attribute) and not isinstance(node, ast.Attribute):  # the outermost of a chain
        found = _chain(child)
        if found:
          by_scope[(id(inner), found[0])].append((child.lineno, found[1]))
      visit(child, inner)

  visit(ast.parse(source, where), None)
  reads = collections.defaultdict(set)
  for chains in by_scope.values():
    firsts = {names[0] for _, names in chains if names[0] not in _METHODS}
    if firsts & (set(_BLOCK_FIELDS) | _TOP):  # the run's config
      for line, names in chains:
        if names[0] in _METHODS:
          continue
        field = names[0] if names[0] in _TOP or len(names) == 1 or names[1] in _METHODS else ".".join(names[:2])
        reads[field].add(f"{where}:{line}")
      continue
    for block, fields in _BLOCK_FIELDS.items():  # one block of it
      if len(firsts & fields) * 2 > len(firsts):
        for line, names in chains:
          if names[0] not in _METHODS:
            reads[f"{block}.{names[0]}"].add(f"{where}:{line}")
  return reads


def _undeclared(reads: dict[str, set[str]]) -> dict[str, list[str]]:
  """The fields of `reads` the schema does not declare (a whole block, `config.data`, is declared), with where."""
  return {f: sorted(p)[:3] for f, p in reads.items() if not (config_schema.declared(f) or f in _BLOCK_FIELDS)}


def _tree_reads() -> dict[str, set[str]]:
  reads = collections.defaultdict(set)
  for top in SOURCES:
    path = REPO / top
    for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
      for field, places in config_reads(file.read_text(), str(file.relative_to(REPO))).items():
        reads[field] |= places
  return reads


def test_a_config_per_dataset():
  assert set(DATASETS) <= set(datasets.NAMES)
  assert set(DATASETS) <= set(CONFIGS)
  assert {"base", "smoke"} <= set(CONFIGS)


def test_the_scan_finds_reads_of_the_config_and_its_blocks():
  """The scan on code shaped like the package's: the run config read by name, through self/run, and one block taken
  as `config` (optim.py); a CLIP config called `config` or `cfg` is not the run's."""
  source = """
def train(config, run):
  cfg = config.copy_and_resolve_references()
  n = cfg.train.batch_size + config.trian.keep + run.config.seed + cfg.data.get("resize")
  with cfg.unlocked():
    cfg.clip.image_chunk = config.mesh.data
  return config.optim.copy_and_resolve_references(), config.num_splts, lambda: cfg.eval.numcrops

def schedule(config):
  return config.lr * config.warmup_steps + config.final_lr

def clip_tower(config, cfg):
  return config.vision.hidden_size, cfg.text.num_hidden_layers, cfg.dtype
"""
  reads = config_reads(source, "x.py")
  assert {f: sorted(p) for f, p in reads.items()} == {
      "train.batch_size": ["x.py:4"], "trian.keep": ["x.py:4"], "seed": ["x.py:4"], "data": ["x.py:4"],
      "clip.image_chunk": ["x.py:6"], "mesh.data": ["x.py:6"], "optim": ["x.py:7"], "num_splts": ["x.py:7"],
      "eval.numcrops": ["x.py:7"], "optim.lr": ["x.py:10"], "optim.warmup_steps": ["x.py:10"],
      "optim.final_lr": ["x.py:10"]}
  assert set(_undeclared(reads)) == {"trian.keep", "num_splts", "eval.numcrops", "optim.final_lr"}


def test_every_config_field_the_code_reads_is_in_the_schema():
  reads = _tree_reads()
  assert len(reads) > 30, sorted(reads)  # the scan sees the code (about 60 fields today)
  unknown = _undeclared(reads)
  assert not unknown, f"fields read but not in mcpf_jax/config_schema.py: {unknown}"


def test_the_schema_matches_the_defaults_and_its_names_are_readable_as_attributes():
  config_schema.validate(base.get_config(), "configs/base.py")
  assert not {part for k in _DECLARED for part in k.split(".")} & _METHODS  # config.x.get would be the method


def test_the_schema_names_each_wrong_field():
  config = base.get_config()
  config.clip.dtype = "fp16"
  with config.unlocked():
    config.train.bogus = 1
    del config.mesh["data"]
    config.model.quality_classes = ("bad", 2)
  with pytest.raises(ValueError) as e:
    config_schema.validate(config, "configs/x.py")
  assert str(e.value).splitlines() == [
      "configs/x.py does not match the config schema:", "  mesh.data: missing (expected int)",
      "  clip.dtype: 'fp16' is not 'float32' | 'bfloat16'",
      "  model.quality_classes: ('bad', 2) is not a tuple of str",
      "  train.bogus: not a config field (the fields are those of mcpf_jax/config_schema.py and those the modules "
      "of config.plugins declare)"]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds(name):
  config = _load(name + ".py")
  resolve.load_plugins(config)  # as resolve() does before validating: a plugin declares the fields it reads
  config_schema.validate(config, f"configs/{name}.py")
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
  optim.make_optimizer(resolve.optim_config(config, steps_per_epoch=10), mask)
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
  config = _load("koniq10k.py", "--config.data.split_protocol=official", "--config.num_splits=10")
  assert config.data.split_protocol == "official" and config.num_splits == 10
  assert set(datasets.info("koniq10k")["official_split_names"]) == {"training", "validation", "test"}


def test_unknown_override_is_refused():
  with pytest.raises(Exception, match="no_such_field"):
    _load("livec.py", "--config.data.no_such_field=1")


def test_a_dataset_is_the_argument_of_the_base_config():
  """`--config configs/base.py:spaq` (the sweep's form) is configs/spaq.py, overrides included; a name that is not a
  dataset is refused with the known ones."""
  swept = _load("base.py:spaq", "--config.optim.lr=5e-4")
  assert swept.to_dict() == _load("spaq.py", "--config.optim.lr=5e-4").to_dict()
  assert swept.data.name == "spaq" and swept.optim.lr == 5e-4
  with pytest.raises(Exception, match="no dataset 'spaqq'.*expected one of livec, koniq10k"):
    _load("base.py:spaqq")


def test_a_backbone_family_config_takes_the_dataset_too():
  """configs/siglip2.py:<dataset> is that dataset's config on SigLIP 2 B/16; without an argument it is
  configs/livec_siglip2.py."""
  koniq = _load("siglip2.py:koniq10k")
  expected = _load("koniq10k.py", "--config.clip.name=google/siglip2-base-patch16-224")
  assert koniq.to_dict() == expected.to_dict()
  assert _load("siglip2.py").to_dict() == _load("livec_siglip2.py").to_dict()
  assert _load("livec_siglip2.py").data.name == "livec"


def test_a_plugin_declares_the_fields_it_reads():
  """The smoke plugin's fields are its own declaration, not the core schema's; a clash is refused by name."""
  assert {"clip.tiny", "clip.tiny_seed"} <= set(config_schema.OPTIONAL)
  assert not {"clip.tiny", "clip.tiny_seed"} & set(config_schema.FIELDS)
  config_schema.declare("clip.tiny_seed", int)  # again, the same type: nothing changes
  with pytest.raises(ValueError, match="clip.tiny_seed: declared as int, now as str"):
    config_schema.declare("clip.tiny_seed", str)
  with pytest.raises(ValueError, match="clip.name: a built-in config field"):
    config_schema.declare("clip.name", str)
  config = base.get_config()
  with config.unlocked():
    config.clip.tiny_seed = "0"
  assert config_schema.problems(config) == ["clip.tiny_seed: '0' is not int"]
