"""CLIP's text tokenizer: OpenAI CLIP's text cleanup in front of the Hugging Face `tokenizers` BPE engine.

The ids are those of OpenAI CLIP's `SimpleTokenizer` (and of the ftfy-based "slow" `CLIPTokenizer` of
transformers 4.x): the text is cleaned in Python exactly as CLIP does (ftfy.fix_text, HTML unescaped twice,
whitespace runs collapsed, stripped, lower-cased), then split and byte-pair encoded by `tokenizers` (Rust).
The tokenizers-only `CLIPTokenizer` of transformers 5 (= `CLIPTokenizerFast`) skips the ftfy and HTML steps, so it
gives other ids for mojibake, curly quotes, full-width characters, ligatures and HTML entities; everywhere else
all three agree (tests/test_tokenizer.py).

Batches are `[batch, context_length]` int32: `<|startoftext|>`, the text's tokens, `<|endoftext|>`, then the
pad id. A text longer than `context_length - 2` tokens is cut so that `<|endoftext|>` stays last (as transformers
does with `truncation=True`, and as open_clip does). The pad id is read from the checkpoint's
`tokenizer_config.json` / `special_tokens_map.json` (`pad_token`); OpenAI checkpoints pad with `<|endoftext|>`
(49407), which is also the default. CLIP pools the text at the first `<|endoftext|>` (or the highest id), so
the pad id does not change the features as long as it is not above 49407.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import html
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import ftfy
import numpy as np
import regex
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
CONTEXT_LENGTH = 77

# OpenAI CLIP's merges file and how many of its merges CLIP uses (49408 ids in all).
DEFAULT_BPE_PATH = pathlib.Path(__file__).resolve().parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2

# CLIP's pre-tokenisation: special tokens, English contractions, letter runs, single digits, other-symbol runs.
_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_WHITESPACE = regex.compile(r"\s+")

# Files of a Hugging Face CLIP tokenizer folder.
TOKENIZER_JSON = "tokenizer.json"
VOCAB_JSON = "vocab.json"
MERGES_TXT = "merges.txt"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
_HUB_FILES = [TOKENIZER_JSON, VOCAB_JSON, MERGES_TXT, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP]


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2 / CLIP byte-to-symbol table: each of the 256 bytes as a printable, non-space character.

  The order of the table is part of CLIP's vocabulary: ids 0..255 are these symbols in this order.
  """
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) +
               list(range(ord("®"), ord("ÿ") + 1)))
  byte_values = printable[:]
  code_points = printable[:]
  n = 0
  for b in range(256):
    if b not in printable:
      byte_values.append(b)
      code_points.append(256 + n)
      n += 1
  return dict(zip(byte_values, (chr(c) for c in code_points)))


def clean_text(text: str) -> str:
  """CLIP's text cleanup (OpenAI `basic_clean` + `whitespace_clean` + lower-casing).

  ftfy repairs mojibake and normalises (NFC, curly quotes, full-width forms, ligatures); HTML entities are
  unescaped twice (so `&amp;amp;` becomes `&`); whitespace runs become one space; the text is stripped and
  lower-cased.
  """
  text = ftfy.fix_text(text)
  text = html.unescape(html.unescape(text)).strip()
  return _WHITESPACE.sub(" ", text).strip().lower()


def read_bpe_merges(path: str | os.PathLike[str] = DEFAULT_BPE_PATH) -> list[tuple[str, str]]:
  """The first `NUM_MERGES` merges of an OpenAI CLIP `bpe_simple_vocab_16e6.txt.gz` file.

  Raises:
    ValueError: the file is not a CLIP merges file (too few lines, or a line that is not one pair).
  """
  path = pathlib.Path(path)
  with gzip.open(path, "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")
  merges = lines[1:NUM_MERGES + 1]  # line 0 is a header
  if len(merges) != NUM_MERGES:
    raise ValueError(f"{path}: expected at least {NUM_MERGES + 1} lines of BPE merges, found {len(lines)}")
  pairs = []
  for i, line in enumerate(merges, start=2):
    parts = line.split()
    if len(parts) != 2:
      raise ValueError(f"{path}: line {i} is not a BPE merge 'left right': {line!r}")
    pairs.append((parts[0], parts[1]))
  return pairs


def clip_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
  """CLIP's token -> id table built from its merges, in OpenAI's order.

  Bytes, bytes + '</w>', one token per merge, then `<|startoftext|>` and `<|endoftext|>`.
  """
  symbols = list(bytes_to_unicode().values())
  tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
  return {t: i for i, t in enumerate(tokens)}


def write_tokenizer_files(folder: str | os.PathLike[str],
                          bpe_path: str | os.PathLike[str] = DEFAULT_BPE_PATH) -> pathlib.Path:
  """Writes Hugging Face CLIP tokenizer files converted from OpenAI's BPE merges.

  The files are those of `openai/clip-vit-base-patch32` (`vocab.json`, `merges.txt` with its `#version: 0.2`
  header, `tokenizer_config.json`, `special_tokens_map.json`), so `transformers.CLIPTokenizer.from_pretrained`
  and `Tokenizer.from_pretrained` both load the folder; used to build offline CLIP folders.

  Args:
    folder: where to write (created if missing; existing tokenizer files are overwritten).
    bpe_path: OpenAI's `bpe_simple_vocab_16e6.txt.gz` (default: the copy bundled with mcpf_jax).

  Returns:
    The folder.
  """
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  merges = read_bpe_merges(bpe_path)
  vocab = clip_vocab(merges)
  (folder / VOCAB_JSON).write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
  with open(folder / MERGES_TXT, "w", encoding="utf-8", newline="\n") as f:
    f.write("#version: 0.2\n")
    f.writelines(f"{a} {b}\n" for a, b in merges)
  special = {"bos_token": SOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN, "pad_token": EOT_TOKEN}
  config = {
      "tokenizer_class": "CLIPTokenizer",
      "model_max_length": CONTEXT_LENGTH,
      "do_lower_case": True,
      "errors": "replace",
      "add_prefix_space": False,
      **special,
  }
  (folder / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
  (folder / SPECIAL_TOKENS_MAP).write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
  return folder


def _bpe_backend(vocab: dict[str, int], merges: Sequence[tuple[str, str]]) -> tokenizers.Tokenizer:
  """A `tokenizers` pipeline equal to CLIP's after `clean_text` (as transformers builds it for CLIP)."""
  backend = tokenizers.Tokenizer(
      models.BPE(vocab=vocab, merges=list(merges), continuing_subword_prefix="", end_of_word_suffix="</w>",
                 fuse_unk=False, unk_token=EOT_TOKEN))
  backend.normalizer = normalizers.Sequence(
      [normalizers.NFC(), normalizers.Replace(tokenizers.Regex(r"\s+"), " "), normalizers.Lowercase()])
  backend.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(_SPLIT_PATTERN), behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  backend.decoder = decoders.ByteLevel()
  backend.add_special_tokens([SOT_TOKEN, EOT_TOKEN])
  return backend


def _read_json(path: pathlib.Path) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: cannot read JSON ({e})") from e
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
  return data


def _special_token_names(folder: pathlib.Path) -> dict[str, str]:
  """bos/eos/pad token strings of a tokenizer folder, with transformers' precedence.

  `special_tokens_map.json` overrides `tokenizer_config.json` unless the config is in the current format (it has
  `added_tokens_decoder`), in which case the config alone counts. Missing entries are CLIP's.
  """
  names = {"bos_token": SOT_TOKEN, "eos_token": EOT_TOKEN, "pad_token": EOT_TOKEN}
  config_path, map_path = folder / TOKENIZER_CONFIG, folder / SPECIAL_TOKENS_MAP
  config = _read_json(config_path) if config_path.is_file() else {}
  sources = [config]
  if map_path.is_file() and "added_tokens_decoder" not in config:
    sources.append(_read_json(map_path))  # the later source wins
  for source in sources:
    for key in names:
      value = source.get(key)
      if isinstance(value, dict):  # a serialised AddedToken
        value = value.get("content")
      if isinstance(value, str):
        names[key] = value
  return names


def _resolve_folder(folder_or_hub_id: str | os.PathLike[str]) -> pathlib.Path:
  """A local folder as is; otherwise the tokenizer files of a hub repo (from the local cache when offline)."""
  path = pathlib.Path(folder_or_hub_id)
  if path.is_dir():
    return path
  name = str(folder_or_hub_id)
  if path.exists() or name.count("/") != 1 or name.startswith((".", "/")):
    raise FileNotFoundError(f"{name}: not a tokenizer folder (expected a directory with {TOKENIZER_JSON}, or "
                            f"{VOCAB_JSON} + {MERGES_TXT}), nor a Hugging Face hub id 'org/name'")
  from mcpf_jax.clip import hub  # pylint: disable=import-outside-toplevel
  return hub.snapshot(name, allow_patterns=_HUB_FILES)


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """CLIP tokenizer: `tok(["a photo", ...]) -> int32 [batch, 77]`.

  Attributes:
    backend: the `tokenizers.Tokenizer` that splits and byte-pair encodes cleaned text (no special tokens).
    sot_token_id: id of `<|startoftext|>`, put first.
    eot_token_id: id of `<|endoftext|>`, put after the text (CLIP pools the text there).
    pad_token_id: id that fills the rest of the context.
  """

  backend: tokenizers.Tokenizer
  sot_token_id: int
  eot_token_id: int
  pad_token_id: int

  @classmethod
  def default(cls) -> Tokenizer:
    """OpenAI CLIP's tokenizer from the vocabulary bundled with mcpf_jax (pads with `<|endoftext|>`)."""
    return _default_tokenizer()

  @classmethod
  def from_bpe_file(cls, bpe_path: str | os.PathLike[str] = DEFAULT_BPE_PATH) -> Tokenizer:
    """From an OpenAI `bpe_simple_vocab_16e6.txt.gz` file; pads with `<|endoftext|>` as OpenAI CLIP does."""
    merges = read_bpe_merges(bpe_path)
    return cls._from_backend(_bpe_backend(clip_vocab(merges), merges), pathlib.Path(bpe_path),
                             {"bos_token": SOT_TOKEN, "eos_token": EOT_TOKEN, "pad_token": EOT_TOKEN})

  @classmethod
  def from_pretrained(cls, folder_or_hub_id: str | os.PathLike[str]) -> Tokenizer:
    """From a Hugging Face CLIP tokenizer folder (or hub id, read through the local hub cache).

    The folder holds `tokenizer.json`, or `vocab.json` + `merges.txt`. Special tokens come from
    `tokenizer_config.json` / `special_tokens_map.json` when present (`bos_token`, `eos_token`, `pad_token`),
    else CLIP's (`<|startoftext|>`, `<|endoftext|>`, pad = `<|endoftext|>`).

    Raises:
      FileNotFoundError: neither a folder with tokenizer files nor a reachable hub id.
      ValueError: unreadable files, or special tokens missing from the vocabulary.
    """
    folder = _resolve_folder(folder_or_hub_id)
    if (folder / TOKENIZER_JSON).is_file():
      try:
        backend = tokenizers.Tokenizer.from_file(str(folder / TOKENIZER_JSON))
      except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"{folder / TOKENIZER_JSON}: not a valid tokenizers file ({e})") from e
      # We add the special tokens and pad ourselves.
      backend.no_truncation()
      backend.no_padding()
    elif (folder / VOCAB_JSON).is_file() and (folder / MERGES_TXT).is_file():
      vocab = _read_json(folder / VOCAB_JSON)
      merges = []
      for i, line in enumerate((folder / MERGES_TXT).read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip() or (i == 1 and line.startswith("#version")):
          continue
        parts = line.split()
        if len(parts) != 2:
          raise ValueError(f"{folder / MERGES_TXT}: line {i} is not a BPE merge 'left right': {line!r}")
        merges.append((parts[0], parts[1]))
      backend = _bpe_backend(vocab, merges)
    else:
      present = sorted(p.name for p in folder.iterdir())[:20]
      raise FileNotFoundError(f"{folder}: no CLIP tokenizer files (expected {TOKENIZER_JSON}, or {VOCAB_JSON} + "
                              f"{MERGES_TXT}); found {present}")
    return cls._from_backend(backend, folder, _special_token_names(folder))

  @classmethod
  def _from_backend(cls, backend: tokenizers.Tokenizer, source: pathlib.Path, names: dict[str, str]) -> Tokenizer:
    ids = {}
    for key, token in names.items():
      token_id = backend.token_to_id(token)
      if token_id is None:
        raise ValueError(f"{source}: {key} {token!r} is not in the tokenizer's vocabulary")
      ids[key] = token_id
    return cls(backend=backend, sot_token_id=ids["bos_token"], eot_token_id=ids["eos_token"],
               pad_token_id=ids["pad_token"])

  @property
  def vocab_size(self) -> int:
    """Number of ids, special tokens included (49408 for CLIP)."""
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    """Token ids of one text, without `<|startoftext|>`, `<|endoftext|>`, truncation or padding."""
    return self.backend.encode(clean_text(text), add_special_tokens=False).ids

  def __call__(self, texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
    """Tokenizes texts into CLIP's fixed-length layout.

    Args:
      texts: one text or a sequence of texts.
      context_length: ids per text (CLIP: 77), at least 2.

    Returns:
      int32 [batch, context_length]: `sot, tokens[:context_length - 2], eot, pad, ...`.
    """
    if isinstance(texts, str):
      texts = [texts]
    if context_length < 2:
      raise ValueError(f"context_length must be at least 2 (start and end tokens), got {context_length}")
    encodings = self.backend.encode_batch([clean_text(t) for t in texts], add_special_tokens=False)
    out = np.full((len(texts), context_length), self.pad_token_id, dtype=np.int32)
    for row, enc in zip(out, encodings):
      ids = enc.ids[:context_length - 2]
      row[0] = self.sot_token_id
      row[1:len(ids) + 1] = ids
      row[len(ids) + 1] = self.eot_token_id
    return out


@functools.lru_cache(maxsize=1)
def _default_tokenizer() -> Tokenizer:
  # Built once per process: reading and converting the 49k merges is not free.
  return Tokenizer.from_bpe_file(DEFAULT_BPE_PATH)
