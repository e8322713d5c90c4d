"""Loading and saving CLIP (and SigLIP) weights in the Hugging Face formats, without torch.

config.json's `model_type` says which model a folder holds: "clip" (transformers' CLIPModel, `mcpf_jax.clip.model`)
or "siglip" (SiglipModel, also SigLIP 2 at fixed resolution: `mcpf_jax.clip.siglip`); both are read the same way.

A model folder (local, or a hub snapshot fetched by huggingface_hub into its cache) holds `config.json` and
the weights as either
  - `model.safetensors` (PyTorch names and layouts: Linear `weight` [out, in], Conv2d OIHW, LayerNorm
    `weight`, Embedding `weight`), read lazily tensor by tensor with `safetensors.safe_open`, or
  - `flax_model.msgpack` (the HF Flax CLIP tree, which is our parameter tree as it is).
When both are present `model.safetensors` is used: it is the format transformers and the hub maintain today
(transformers 5 has no Flax models), and it is read tensor by tensor instead of as one blob. The tokenizer
is loaded from the same folder when its files are there.

Every tensor of the model must be in the file with the expected shape, and the file must hold nothing else
(except the `position_ids` buffers older PyTorch checkpoints carry); otherwise the error names the tensors
and the file.

A folder with OpenCLIP's `open_clip_config.json` and no config.json is an OpenCLIP checkpoint
(`mcpf_jax.clip.openclip`: its weights on our CLIP towers); a hub repo is read in the Hugging Face format when it
has it (LAION's repos carry both), else in OpenCLIP's. open_clip's `hf-hub:` prefix is accepted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util

from mcpf_jax.clip import hub, openclip, siglip
from mcpf_jax.clip.config import HUB_IDS, CLIPConfig
from mcpf_jax.clip.init import param_shapes as clip_param_shapes
from mcpf_jax.clip.model import CLIP
from mcpf_jax.clip.siglip import SigLIP, SiglipConfig

__all__ = [
  "MSGPACK",
  "SAFETENSORS",
  "Bundle",
  "fingerprint",
  "load",
  "load_folder",
  "read_config",
  "read_params",
  "save_pretrained",
  "to_torch_state_dict",
]

SAFETENSORS = "model.safetensors"
MSGPACK = "flax_model.msgpack"
WEIGHT_FILES = (SAFETENSORS, MSGPACK)  # in order of preference
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.json")
# Non-persistent buffers that older transformers versions wrote into PyTorch checkpoints; not weights.
_IGNORED_TORCH_KEYS = re.compile(r"^(text_model|vision_model)\.embeddings\.position_ids$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

Params = dict[str, Any]
AnyConfig = CLIPConfig | SiglipConfig


def param_shapes(config: AnyConfig) -> dict[str, Any]:
  """The parameter tree (`jax.ShapeDtypeStruct`s) of a CLIP or SigLIP config."""
  return siglip.param_shapes(config) if isinstance(config, SiglipConfig) else clip_param_shapes(config)


def _model_name(config: AnyConfig) -> str:
  return "SiglipModel" if isinstance(config, SiglipConfig) else "CLIPModel"


@dataclasses.dataclass(frozen=True)
class Bundle:
  """A loaded CLIP.

  Attributes:
    model: the Linen module (`model.apply({"params": params}, ...)`).
    params: float32 parameter tree (HF Flax layout), on the default device.
    tokenizer: `mcpf_jax.clip.tokenizer.Tokenizer` from the folder's tokenizer files, or None without them (an
      OpenCLIP folder: open_clip's tokenizer, CLIP's BPE padded with 0, whatever files it has).
    config: the model's configuration (with the requested compute dtype).
    source: where the weights came from: "<folder>/<file>" or "hf://<repo>@<commit>/<file>".
    fingerprint: short hash of the parameter values (see `fingerprint`).
  """
  model: CLIP | SigLIP
  params: Params
  tokenizer: Any
  config: AnyConfig
  source: str
  fingerprint: str

  def with_compute(self, **changes: Any) -> Bundle:
    """The same weights under other compute options of the config (`remat`, `scan_layers`, ...), the model rebuilt
    from it."""
    config = self.config.replace(**changes)
    return dataclasses.replace(self, config=config, model=self.model.clone(config=config))


def fingerprint(params: Mapping[str, Any]) -> str:
  """16 hex digits of sha256 over the sorted leaf paths, dtypes, shapes and bytes of a parameter tree."""
  digest = hashlib.sha256()
  for path, leaf in sorted(traverse_util.flatten_dict(dict(params), sep="/").items()):
    arr = np.array(jax.device_get(leaf), order="C")
    digest.update(f"{path}|{arr.dtype.str}|{arr.shape}|".encode())
    digest.update(arr.tobytes())
  return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------
# PyTorch (safetensors) names and layouts.


def _torch_key(path: tuple[str, ...]) -> str:
  """Our path -> the PyTorch state-dict key (`.../kernel` -> `....weight`, `scale` -> `weight`, ...)."""
  leaf = path[-1]
  if leaf in ("kernel", "scale", "embedding"):
    path = path[:-1] + ("weight",)
  return ".".join(path)


def _to_torch_layout(path: tuple[str, ...], arr: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel":
    if arr.ndim == 2:  # Dense [in, out] -> Linear [out, in]
      return arr.T
    if arr.ndim == 4:  # Conv HWIO -> OIHW
      return arr.transpose(3, 2, 0, 1)
  return arr


def _from_torch_layout(path: tuple[str, ...], arr: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel":
    if arr.ndim == 2:
      return arr.T
    if arr.ndim == 4:  # OIHW -> HWIO
      return arr.transpose(2, 3, 1, 0)
  return arr


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  return _to_torch_layout(path, np.empty(shape, np.bool_)).shape


def to_torch_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Our parameter tree -> {PyTorch key: float32 array in PyTorch layout} (transformers' CLIPModel keys)."""
  flat = traverse_util.flatten_dict(dict(jax.device_get(params)))
  return {_torch_key(path): np.array(_to_torch_layout(path, np.asarray(v, np.float32)), order="C")  # keeps 0-d
          for path, v in flat.items()}


def _check_names(expected: Iterable[str], found: Iterable[str], source: str,
                 ignored: Callable[[str], bool] = lambda _: False, model: str = "CLIPModel") -> None:
  expected, found = set(expected), set(found)
  missing = sorted(expected - found)
  unknown = sorted(k for k in found - expected if not ignored(k))
  if missing or unknown:
    parts = []
    if missing:
      parts.append(f"missing tensors {missing}")
    if unknown:
      parts.append(f"unknown tensors {unknown}")
    raise ValueError(f"{source}: {'; '.join(parts)} (expected a {model} checkpoint matching config.json)")


def _raise_misshaped(misshaped: list[str], source: str) -> None:
  if misshaped:
    raise ValueError(f"{source}: tensors with the wrong shape: {'; '.join(misshaped)}")


def read_safetensors(path: pathlib.Path, config: AnyConfig, groups: Iterable[str] | None = None) -> Params:
  """A safetensors file of transformers' CLIPModel / SiglipModel (PyTorch names and layouts) -> our float32 tree.

  `groups`: read only these top-level parameter groups (e.g. ("vision_model", "visual_projection")), for a file
  holding just them; None: the whole model. Names and shapes are checked against `config`; errors name the file.
  """
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  shapes = traverse_util.flatten_dict(param_shapes(config))
  if groups is not None:
    groups = set(groups)
    shapes = {p: s for p, s in shapes.items() if p[0] in groups}
  expected = {_torch_key(p): p for p in shapes}
  flat, misshaped = {}, []
  with safe_open(str(path), framework="numpy") as f:
    _check_names(expected, f.keys(), str(path), lambda k: bool(_IGNORED_TORCH_KEYS.match(k)), _model_name(config))
    for key, p in sorted(expected.items()):
      want = _torch_shape(p, shapes[p].shape)
      got = tuple(f.get_slice(key).get_shape())
      if got != want:
        misshaped.append(f"{key} is {list(got)}, expected {list(want)}")
        continue
      try:
        arr = f.get_tensor(key)
      except (TypeError, ValueError) as e:  # e.g. bfloat16, which numpy cannot represent
        raise ValueError(f"{path}: cannot read tensor {key} as numpy ({e}); expected float32/float16") from e
      flat[p] = np.asarray(_from_torch_layout(p, arr), np.float32)
  _raise_misshaped(misshaped, str(path))
  return traverse_util.unflatten_dict(flat)


def _read_msgpack(path: pathlib.Path, config: AnyConfig) -> Params:
  try:
    tree = serialization.msgpack_restore(path.read_bytes())
  except Exception as e:  # msgpack raises several unrelated types on corrupt input
    raise ValueError(f"{path}: not a Flax msgpack checkpoint ({type(e).__name__}: {e})") from e
  if not isinstance(tree, dict):
    raise ValueError(f"{path}: expected a dict of parameters, got {type(tree).__name__}")
  if set(tree) == {"params"}:  # some Flax checkpoints keep the collection name
    tree = tree["params"]
  shapes = {"/".join(p): s.shape for p, s in traverse_util.flatten_dict(param_shapes(config)).items()}
  found = {"/".join(p): v for p, v in traverse_util.flatten_dict(tree).items()}
  _check_names(shapes, found, str(path), model=_model_name(config))
  misshaped = [f"{k} is {list(np.shape(found[k]))}, expected {list(shapes[k])}" for k in sorted(shapes)
               if tuple(np.shape(found[k])) != tuple(shapes[k])]
  _raise_misshaped(misshaped, str(path))
  return traverse_util.unflatten_dict({tuple(k.split("/")): np.asarray(v, np.float32) for k, v in found.items()})


def read_config(folder: str | os.PathLike[str], *, dtype: str = "float32", remat: bool = False) -> AnyConfig:
  """`folder/config.json` -> CLIPConfig, or SiglipConfig for `model_type` "siglip" (and "siglip2", refused there by
  name)."""
  path = pathlib.Path(folder) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: a CLIP model folder needs the Hugging Face config.json")
  try:
    raw = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e
  if isinstance(raw, dict) and raw.get("model_type") in ("siglip", "siglip2"):
    return SiglipConfig.from_hf(raw, dtype=dtype, remat=remat, source=str(path))
  return CLIPConfig.from_hf(raw, dtype=dtype, remat=remat, source=str(path))


def read_params(folder: str | os.PathLike[str], config: AnyConfig) -> tuple[Params, pathlib.Path]:
  """Reads the weights of `folder` as a float32 numpy tree; returns it and the file it came from."""
  folder = pathlib.Path(folder)
  for name, reader in ((SAFETENSORS, read_safetensors), (MSGPACK, _read_msgpack)):
    if (folder / name).is_file():
      return reader(folder / name, config), folder / name
  raise FileNotFoundError(f"{folder}: no weights found (expected {SAFETENSORS} or {MSGPACK})")


def _tokenizer(folder: pathlib.Path) -> Any:
  """The folder's tokenizer, or None if it has no tokenizer files or the tokenizer module is not there."""
  has_files = (folder / "tokenizer.json").is_file() or (
      (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())
  if not has_files:
    return None
  try:
    from mcpf_jax.clip import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError as e:
    if e.name != "mcpf_jax.clip.tokenizer":
      raise
    return None
  return tokenizer_lib.Tokenizer.from_pretrained(folder)


def _siglip_tokenizer(folder: pathlib.Path, config: SiglipConfig) -> Any:
  """SigLIP 2's tokenizer (Gemma's tokenizer.json), padding to the text tower's positions; None without one, or for
  SigLIP 1's SentencePiece file (refused by name where a tokenizer is needed; the towers still load)."""
  from mcpf_jax.clip import siglip_tokenizer  # pylint: disable=g-import-not-at-top
  if not (folder / siglip_tokenizer.TOKENIZER_JSON).is_file():
    return None
  try:
    return siglip_tokenizer.SiglipTokenizer.from_pretrained(folder, config.text.max_position_embeddings)
  except ValueError as e:
    if "SigLIP 1" in str(e):
      return None
    raise


PARAM_DTYPES = ("float32", "bfloat16")


def cast_params(params: Params, param_dtype: str) -> Params:
  """The floating-point leaves of `params` stored in `param_dtype` (bfloat16 halves a frozen backbone's memory)."""
  if param_dtype not in PARAM_DTYPES:
    raise ValueError(f"param_dtype {param_dtype!r} is not one of {PARAM_DTYPES}")
  target = jnp.dtype(param_dtype)
  return jax.tree.map(lambda x: x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def load_folder(folder: str | os.PathLike[str], *, dtype: str = "float32", remat: bool = False,
                source: str | None = None, param_dtype: str = "float32") -> Bundle:
  """Loads a local Hugging Face CLIP folder (see the module docstring).

  param_dtype: how the weights are stored in memory ("bfloat16" halves them); the fingerprint is always that of
  the float32 values in the file, so a run's backbone check does not depend on it.
  """
  folder = pathlib.Path(folder).expanduser()
  is_openclip = openclip.is_openclip_folder(folder)
  if is_openclip:
    config = openclip.read_config(folder, dtype=dtype, remat=remat)
    params, weights = openclip.read_params(folder, config)
  else:
    config = read_config(folder, dtype=dtype, remat=remat)
    params, weights = read_params(folder, config)
  digest = fingerprint(params)
  if param_dtype != "float32":
    params = cast_params(params, param_dtype)
  if isinstance(config, SiglipConfig):
    model, tokenizer = SigLIP(config), _siglip_tokenizer(folder, config)
  elif is_openclip:
    model, tokenizer = CLIP(config), openclip.tokenizer()
  else:
    model, tokenizer = CLIP(config), _tokenizer(folder)
  return Bundle(model=model, params=jax.device_put(params), tokenizer=tokenizer, config=config,
                source=source or str(weights.resolve()), fingerprint=digest)


def _hub_snapshot(repo_id: str, revision: str | None, cache_dir: str | None) -> tuple[pathlib.Path, str]:
  """config.json, one weight file (the first of WEIGHT_FILES the repo has) and the tokenizer files of a hub repo.

  Returns the snapshot folder and the name of the weight file.
  """
  where = f"hub model {repo_id!r} (revision {revision or 'main'})"
  for weights in WEIGHT_FILES:  # one weight file fetched, not every format the repo offers
    folder = hub.snapshot(repo_id, revision=revision, cache_dir=cache_dir,
                          allow_patterns=("config.json", weights, *TOKENIZER_FILES))
    if (folder / weights).is_file():
      break
  else:
    return _openclip_snapshot(repo_id, revision, cache_dir, where, folder)
  if not (folder / "config.json").is_file():
    raise FileNotFoundError(f"{where}: has no config.json (in {folder})")
  return folder, weights


def _openclip_snapshot(repo_id: str, revision: str | None, cache_dir: str | None, where: str,
                       hf_folder: pathlib.Path) -> tuple[pathlib.Path, str]:
  """open_clip_config.json and one OpenCLIP weight file of a hub repo without Hugging Face weights."""
  for weights in openclip.WEIGHT_FILES:
    folder = hub.snapshot(repo_id, revision=revision, cache_dir=cache_dir,
                          allow_patterns=(openclip.CONFIG, weights))
    if (folder / weights).is_file() and (folder / openclip.CONFIG).is_file():
      return folder, weights
  raise FileNotFoundError(f"{where}: has none of {list(WEIGHT_FILES)} with config.json, nor OpenCLIP's "
                          f"{openclip.CONFIG} with one of {list(openclip.WEIGHT_FILES)} (in {hf_folder})")


def load(name_or_path: str | os.PathLike[str], *, dtype: str = "float32", revision: str | None = None,
         remat: bool = False, cache_dir: str | None = None, param_dtype: str = "float32") -> Bundle:
  """Loads a CLIP from a local folder, a hub id ("openai/clip-vit-base-patch16") or a preset name.

  Args:
    name_or_path: a folder with config.json + weights (or an OpenCLIP folder: open_clip_config.json + weights); a
      Hugging Face hub repo id (also as "hf-hub:<repo>"); or one of the presets "vit-b-32", "vit-b-16", "vit-l-14",
      "vit-l-14-336" (their OpenAI hub repos).
    dtype: compute dtype, "float32" or "bfloat16" (bf16 inputs, float32-accumulating matmuls).
    revision: hub branch, tag or commit (hub ids only).
    param_dtype: the weights' dtype in memory: "float32" or "bfloat16" (a frozen backbone's half-size copy).
    remat: rematerialise every transformer block in the backward pass.
    cache_dir: Hugging Face cache folder (default: huggingface_hub's, i.e. HF_HUB_CACHE).

  Returns:
    A Bundle; `source` names the folder or "hf://<repo>@<commit>" and the weight file.
  """
  path = pathlib.Path(name_or_path).expanduser()
  if path.is_dir():
    if revision is not None:
      raise ValueError(f"revision={revision!r} given for the local folder {path}")
    return load_folder(path, dtype=dtype, remat=remat, param_dtype=param_dtype)
  name = str(name_or_path)
  repo_id = HUB_IDS.get(name, name.removeprefix("hf-hub:"))  # open_clip's spelling of a hub id
  if path.exists() or not _REPO_ID.match(repo_id):
    raise FileNotFoundError(f"{name}: not a model folder, a hub repo id or a preset ({sorted(HUB_IDS)})")
  folder, weights = _hub_snapshot(repo_id, revision, cache_dir)
  # huggingface_hub lays snapshots out as .../snapshots/<commit>/<file>.
  return load_folder(folder, dtype=dtype, remat=remat, source=f"hf://{repo_id}@{folder.name}/{weights}",
                     param_dtype=param_dtype)


def save_pretrained(folder: str | os.PathLike[str], params: Mapping[str, Any], config: CLIPConfig, *,
                    tokenizer_files: bool = False) -> pathlib.Path:
  """Writes a transformers-loadable CLIP folder: config.json + model.safetensors (PyTorch names/layouts).

  Args:
    folder: created if needed; existing files of the same names are replaced.
    params: parameter tree matching `config`.
    config: the model's configuration.
    tokenizer_files: also write the CLIP tokenizer files (`mcpf_jax.clip.tokenizer.write_tokenizer_files`).

  Returns:
    The folder.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  folder = pathlib.Path(folder)
  expected = {p: s.shape for p, s in traverse_util.flatten_dict(param_shapes(config)).items()}
  flat = traverse_util.flatten_dict(dict(params))
  _check_names({"/".join(p) for p in expected}, {"/".join(p) for p in flat}, "save_pretrained(params)")
  _raise_misshaped([f"{'/'.join(p)} is {list(np.shape(flat[p]))}, expected {list(s)}"
                    for p, s in sorted(expected.items()) if tuple(np.shape(flat[p])) != tuple(s)],
                   "save_pretrained(params)")
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(config.to_hf(), indent=2) + "\n")
  save_file(to_torch_state_dict(params), str(folder / SAFETENSORS), metadata={"format": "pt"})
  if tokenizer_files:
    from mcpf_jax.clip.tokenizer import write_tokenizer_files  # pylint: disable=g-import-not-at-top
    write_tokenizer_files(folder)
  return folder
