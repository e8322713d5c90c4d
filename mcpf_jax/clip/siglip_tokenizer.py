"""SigLIP's text tokenizers, with the interface of `mcpf_jax.clip.tokenizer.Tokenizer` (`tok(texts) -> int32 ids`).

SigLIP 2 (fixed resolution: `google/siglip2-base-patch16-224`, ...) uses Gemma's tokenizer, shipped as a
`tokenizer.json` (byte-fallback BPE, 256k ids) that the `tokenizers` library reads. As in SigLIP 2's training
(big_vision: `lower` then `tok(..., eos="sticky")`) and in transformers' `Siglip2Tokenizer` (Gemma's tokenizer with a
`Lowercase` normaliser in front):
  - the text is lower-cased, then tokenized without a `<bos>` (the checkpoints' `tokenizer_config.json` has
    `add_bos_token: false`, `add_eos_token: true`);
  - `<eos>` is put after the text; a text longer than `context_length - 1` tokens is cut so that `<eos>` stays;
  - every row is padded on the RIGHT with `<pad>` to the full `context_length` (64): the text tower has no attention
    mask and pools the last position, and the models were trained on rows of exactly 64 ids (transformers says to
    call it with `padding="max_length", max_length=64`). transformers' Gemma classes default to left padding; the
    training layout is right padding, which is what this class writes.
The ids equal transformers' `Siglip2Tokenizer(..., padding="max_length", max_length=64, truncation=True,
padding_side="right")` (tests/test_siglip_tokenizer.py).

SigLIP 1 (`google/siglip-base-patch16-224`, ...) ships only a SentencePiece `spiece.model` (no `tokenizer.json`),
which needs the `sentencepiece` library; mcpf_jax does not depend on it, so such a folder is refused by name. Its
towers still load and run on ids from any tokenizer (`encode_text`).

Placement of prompts: neither tokenizer puts a start token first, so a SigLIP text tower's learnable prompts take
positions 0..n-1 (`mcpf_jax.clip.siglip`), where CLIP's take 1..n after `<|startoftext|>`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import tokenizers
from tokenizers import normalizers

CONTEXT_LENGTH = 64
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPIECE_MODEL = "spiece.model"
HUB_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, "special_tokens_map.json", SPIECE_MODEL)


def _read_config(folder: pathlib.Path) -> dict[str, Any]:
  path = folder / TOKENIZER_CONFIG
  if not path.is_file():
    return {}
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: cannot read JSON ({e})") from e
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
  return data


def _token(config: dict[str, Any], key: str, default: str) -> str:
  value = config.get(key, default)
  if isinstance(value, dict):  # a serialised AddedToken
    value = value.get("content")
  if not isinstance(value, str):
    raise ValueError(f"{TOKENIZER_CONFIG}: {key} is {value!r}, expected a token string")
  return value


def has_tokenizer_files(folder: str | os.PathLike[str]) -> bool:
  """Whether a SigLIP folder carries tokenizer files (usable or refused by name by `from_pretrained`)."""
  folder = pathlib.Path(folder)
  return (folder / TOKENIZER_JSON).is_file() or (folder / SPIECE_MODEL).is_file()


@dataclasses.dataclass(frozen=True)
class SiglipTokenizer:
  """SigLIP 2's tokenizer: `tok(["a photo", ...]) -> int32 [batch, 64]` (see the module docstring).

  Attributes:
    backend: the `tokenizers.Tokenizer` (lower-casing normaliser in front; no special tokens, truncation or padding).
    eot_token_id: id of `<eos>`, put after the text.
    pad_token_id: id of `<pad>`, filling the rest of the row.
    bos_token_id: id put first, or None (SigLIP 2: `add_bos_token` is false).
    context_length: ids per row by default (the text tower's `max_position_embeddings`, 64).
  """

  backend: tokenizers.Tokenizer
  eot_token_id: int
  pad_token_id: int
  bos_token_id: int | None = None
  context_length: int = CONTEXT_LENGTH

  @property
  def prompt_offset(self) -> int:
    """The position of the first token after the start token(s): where the text (and the prompts) begin."""
    return 0 if self.bos_token_id is None else 1

  @classmethod
  def from_pretrained(cls, folder: str | os.PathLike[str], context_length: int = CONTEXT_LENGTH) -> SiglipTokenizer:
    """From a SigLIP 2 folder's `tokenizer.json` (+ `tokenizer_config.json` for the special tokens and flags).

    Raises:
      FileNotFoundError: no tokenizer.json (and no spiece.model).
      ValueError: a SigLIP 1 SentencePiece tokenizer (named, with the reason), unreadable files, or special tokens
        missing from the vocabulary.
    """
    folder = pathlib.Path(folder)
    config = _read_config(folder)
    tokenizer_class = config.get("tokenizer_class")
    if tokenizer_class == "SiglipTokenizer" or not (folder / TOKENIZER_JSON).is_file():
      if (folder / SPIECE_MODEL).is_file() or tokenizer_class == "SiglipTokenizer":
        raise ValueError(f"{folder}: a SigLIP 1 SentencePiece tokenizer ({SPIECE_MODEL}, tokenizer_class "
                         f"{tokenizer_class!r}) is not supported: reading it needs the sentencepiece library, which "
                         "mcpf_jax does not depend on, and its text canonicalisation (punctuation removed) is not "
                         "implemented. SigLIP 2 checkpoints (Gemma's tokenizer.json) are supported; SigLIP 1's "
                         "towers load and take ids from any tokenizer")
      raise FileNotFoundError(f"{folder}: no {TOKENIZER_JSON} (SigLIP 2's Gemma tokenizer)")
    path = folder / TOKENIZER_JSON
    try:
      backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
      raise ValueError(f"{path}: not a valid tokenizers file ({e})") from e
    backend.no_truncation()
    backend.no_padding()
    # transformers' Siglip2Tokenizer: Lowercase in front of Gemma's normaliser (idempotent if already there).
    steps = [normalizers.Lowercase()] + ([backend.normalizer] if backend.normalizer is not None else [])
    backend.normalizer = normalizers.Sequence(steps)
    ids = {}
    for key, default in (("eos_token", "<eos>"), ("pad_token", "<pad>"), ("bos_token", "<bos>")):
      token = _token(config, key, default)
      ids[key] = backend.token_to_id(token)
      if ids[key] is None and key != "bos_token":
        raise ValueError(f"{path}: {key} {token!r} is not in the tokenizer's vocabulary")
    add_bos, add_eos = config.get("add_bos_token", False), config.get("add_eos_token", True)
    if not add_eos:
      raise ValueError(f"{folder / TOKENIZER_CONFIG}: add_eos_token is false; SigLIP's text tower pools the last "
                       "position and was trained with <eos> after every text")
    if add_bos and ids["bos_token"] is None:
      raise ValueError(f"{path}: add_bos_token is true but bos_token is not in the vocabulary")
    return cls(backend=backend, eot_token_id=ids["eos_token"], pad_token_id=ids["pad_token"],
               bos_token_id=ids["bos_token"] if add_bos else None, context_length=context_length)

  @property
  def vocab_size(self) -> int:
    """Number of ids, added tokens included (256000 for SigLIP 2)."""
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    """Token ids of one text (lower-cased), without special tokens, truncation or padding."""
    return self.backend.encode(text, add_special_tokens=False).ids

  def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
    """int32 [batch, context_length]: `[bos,] tokens[:context_length - specials], eos, pad, ...`."""
    if isinstance(texts, str):
      texts = [texts]
    length = self.context_length if context_length is None else context_length
    start = self.prompt_offset
    if length < start + 1:
      raise ValueError(f"context_length must be at least {start + 1} (the special tokens), got {length}")
    encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
    out = np.full((len(texts), length), self.pad_token_id, dtype=np.int32)
    for row, enc in zip(out, encodings):
      ids = enc.ids[:length - start - 1]
      if start:
        row[0] = self.bos_token_id
      row[start:start + len(ids)] = ids
      row[start + len(ids)] = self.eot_token_id
    return out
