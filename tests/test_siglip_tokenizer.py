"""SigLIP 2's tokenizer (mcpf_jax.clip.siglip_tokenizer) against transformers' `Siglip2Tokenizer` (Gemma's tokenizer
with SigLIP 2's lower-casing) called as transformers documents for SigLIP 2: `padding="max_length", max_length=64,
truncation=True`, right padding (the training layout; the Gemma classes default to left).

The real vocabulary (google/siglip2-*'s tokenizer.json, Gemma's 256k ids) cannot be downloaded on the machines these
tests run on; the test builds a tokenizer.json of the same format (tests/siglip_support.py)."""

from __future__ import annotations

import numpy as np
import pytest
import transformers
from siglip_support import write_gemma_tokenizer

from mcpf_jax.clip.siglip_tokenizer import SiglipTokenizer

TEXTS = ["a photo of a bad quality image.", "GOOD Quality", "x x x x perfect quality.", "", "  two  spaces ",
         "café ☃ 日本 ünïcode 😀", "a photo of a " * 30, "X X X X Bad photo."]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return write_gemma_tokenizer(tmp_path_factory.mktemp("siglip2_tok"))


def test_matches_transformers_siglip2_tokenizer(folder):
  ours = SiglipTokenizer.from_pretrained(folder)
  ref = transformers.Siglip2Tokenizer.from_pretrained(folder, padding_side="right")
  want = np.asarray(ref(TEXTS, padding="max_length", max_length=64, truncation=True)["input_ids"])
  got = ours(TEXTS)
  assert got.dtype == np.int32 and got.shape == (len(TEXTS), 64)
  np.testing.assert_array_equal(got, want)
  # The layout: no <bos>; <eos> after the text, kept when a long text is cut; <pad> to the end.
  assert ours.prompt_offset == 0 and ours.bos_token_id is None
  assert (ours.eot_token_id, ours.pad_token_id) == (1, 0)
  n = len(ours.encode(TEXTS[1]))
  assert got[1, n] == 1 and np.all(got[1, n + 1:] == 0) and np.all(got[1, :n] > 4)
  assert got[6, -1] == 1 and np.all(got[6, :-1] > 4)
  # Lower-casing is SigLIP 2's (Gemma's own tokenizer keeps case, and gives other ids here).
  np.testing.assert_array_equal(ours(["GOOD Quality"]), ours(["good quality"]))
  gemma = transformers.GemmaTokenizer.from_pretrained(folder, padding_side="right")
  assert gemma(["GOOD Quality"], padding="max_length", max_length=64)["input_ids"][0] != got[1].tolist()
  assert ours.encode("X X X X") == ref("X X X X", add_special_tokens=False)["input_ids"]
  assert len(ours.encode("X X X X")) == 4
  np.testing.assert_array_equal(ours(TEXTS[:2], context_length=8)[:, :5], got[:2, :5])


def test_siglip1_sentencepiece_is_refused_by_name(tmp_path):
  (tmp_path / "spiece.model").write_bytes(b"\x00")
  (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "SiglipTokenizer"}')
  with pytest.raises(ValueError, match=r"SigLIP 1 SentencePiece tokenizer \(spiece.model.*sentencepiece library"):
    SiglipTokenizer.from_pretrained(tmp_path)
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    SiglipTokenizer.from_pretrained(tmp_path / "missing")
