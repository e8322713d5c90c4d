"""Parity of mcpf_jax.clip.tokenizer with OpenAI CLIP (open_clip's SimpleTokenizer) and transformers.

References (all independent of our code):
  * open_clip's `SimpleTokenizer`: OpenAI's original pure-Python BPE with ftfy + HTML cleanup, loaded from its
    file in site-packages (open_clip itself does not import without torchvision). It pads with 0 and names its
    special tokens `<start_of_text>` / `<end_of_text>` (same ids), so rows are compared up to the first EOT.
  * transformers 5's `CLIPTokenizer`, loaded from the folder `write_tokenizer_files` wrote. In transformers 5 it
    is the `tokenizers`-backed tokenizer (`CLIPTokenizerFast` is the same class; the ftfy-based slow tokenizer
    was removed), so it lacks ftfy/HTML cleanup: on strings where that cleanup changes the text it is compared on
    text pre-cleaned by open_clip's own cleanup function.
"""

import importlib.util
import json
import pathlib

import numpy as np
import pytest
import transformers

from mcpf_jax.clip import tokenizer as tokenizer_lib

OPEN_CLIP_TOKENIZER = (pathlib.Path(transformers.__file__).resolve().parents[1] / "open_clip" / "tokenizer.py")

# Cleanup-insensitive strings: ftfy and HTML unescaping leave them alone after lower-casing.
PLAIN = [
    "a photo of a cat.",
    "A PHOTO OF A DOG!!!",
    "Hello, world? (yes) -- no... [ok] {x} #1 @home $5 100%",
    "café crème brûlée naïve Ångström",
    "cafe\u0301 with a combining accent",
    "😀🎉👍🏽 emoji 🏳️‍🌈 flags",
    "日本語のテキスト 中文 한국어",
    "3.14159 2024-01-01 1,000,000 42nd",
    "   lots   of\t\twhitespace \n\n runs   ",
    "",
    "   ",
    "it's we're they've I'm you'll he'd don't",
    "nbsp\u00a0em\u2003space and zero\u200bwidth",
    "İstanbul ß straße",
    "नमस्ते दुनिया",
    "tab\tand\rcarriage",
    "high-quality, sharp, well-exposed photograph",
]
# Strings the ftfy / HTML cleanup changes: entities, mojibake, curly quotes, ligatures, full width, final sigma.
CLEANUP_SENSITIVE = [
    "Tom &amp; Jerry &lt;3 &quot;quoted&quot; &#39;x&#39;",
    "&amp;amp; is unescaped twice",
    "<b>bold &amp; html</b>",
    "â€œmojibakeâ€\x9d and donâ€™t",
    "Ã©tÃ© mojibake",
    "“curly quotes” and ‘single’",
    "ﬁne ﬂour ligatures",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ １２３",
    "Ελληνικά ΣΟΦΟΣ",
    "control\x00chars\x07here",
]
LONG = ["word " * 100, "a very long sentence " * 30 + "with emoji 😀 at the end"]
ALL = PLAIN + CLEANUP_SENSITIVE + LONG


@pytest.fixture(scope="module")
def open_clip_tokenizer_module():
  spec = importlib.util.spec_from_file_location("open_clip_tokenizer_reference", OPEN_CLIP_TOKENIZER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def open_clip_tok(open_clip_tokenizer_module):
  return open_clip_tokenizer_module.SimpleTokenizer()


@pytest.fixture(scope="module")
def vocab_folder(tmp_path_factory):
  return tokenizer_lib.write_tokenizer_files(tmp_path_factory.mktemp("clip_vocab"))


@pytest.fixture(scope="module")
def hf_tok(vocab_folder):
  return transformers.CLIPTokenizer.from_pretrained(vocab_folder)


@pytest.fixture(scope="module")
def json_folder(tmp_path_factory, vocab_folder):
  folder = tmp_path_factory.mktemp("clip_tokenizer_json")
  transformers.CLIPTokenizerFast.from_pretrained(vocab_folder).save_pretrained(folder)
  return folder


def hf_ids(hf_tok, texts):
  return np.asarray(hf_tok(texts, padding="max_length", truncation=True, max_length=77)["input_ids"])


def up_to_eot(row, eot=49407):
  row = list(row)
  return row[:row.index(eot) + 1]


def test_written_vocabulary_is_openai_clips(vocab_folder, open_clip_tok):
  vocab = json.loads((vocab_folder / "vocab.json").read_text(encoding="utf-8"))
  expected = {k.replace("<start_of_text>", "<|startoftext|>").replace("<end_of_text>", "<|endoftext|>"): v
              for k, v in open_clip_tok.encoder.items()}
  assert vocab == expected
  merges = (vocab_folder / "merges.txt").read_text(encoding="utf-8").splitlines()
  assert merges[0] == "#version: 0.2"
  assert [tuple(m.split()) for m in merges[1:]] == list(open_clip_tok.bpe_ranks)


def test_default_ids_and_sizes():
  tok = tokenizer_lib.Tokenizer.default()
  assert (tok.sot_token_id, tok.eot_token_id, tok.pad_token_id, tok.vocab_size) == (49406, 49407, 49407, 49408)


def test_matches_open_clip_up_to_eot(open_clip_tok):
  ours = tokenizer_lib.Tokenizer.default()(ALL)
  theirs = open_clip_tok(ALL).numpy()
  assert ours.shape == (len(ALL), 77) and ours.dtype == np.int32
  for text, row, ref in zip(ALL, ours, theirs):
    assert up_to_eot(row) == up_to_eot(ref), text
    # After EOT: our pad id (openai's <|endoftext|>), where open_clip pads with 0.
    assert (row[len(up_to_eot(row)):] == 49407).all(), text
    assert (ref[len(up_to_eot(ref)):] == 0).all(), text


def test_matches_transformers_on_plain_text(hf_tok):
  ours = tokenizer_lib.Tokenizer.default()(PLAIN + LONG)
  np.testing.assert_array_equal(ours, hf_ids(hf_tok, PLAIN + LONG))


def test_cleanup_sensitive_text_matches_transformers_after_openai_cleanup(hf_tok, open_clip_tokenizer_module):
  ours = tokenizer_lib.Tokenizer.default()(CLEANUP_SENSITIVE)
  cleaned = [open_clip_tokenizer_module._clean_lower(t) for t in CLEANUP_SENSITIVE]  # pylint: disable=protected-access
  np.testing.assert_array_equal(ours, hf_ids(hf_tok, cleaned))
  # ...and the cleanup matters: transformers 5 on the raw text differs on every one of these strings.
  raw = hf_ids(hf_tok, CLEANUP_SENSITIVE)
  assert all((a != b).any() for a, b in zip(ours, raw))


def test_truncation_keeps_eot_last(open_clip_tok):
  ours = tokenizer_lib.Tokenizer.default()(LONG)
  assert (ours[:, -1] == 49407).all() and (ours[:, 0] == 49406).all()
  np.testing.assert_array_equal(ours, open_clip_tok(LONG).numpy())  # no padding when full


def test_empty_and_mixed_batch():
  tok = tokenizer_lib.Tokenizer.default()
  empty = tok("")
  assert empty.shape == (1, 77)
  assert empty[0, :2].tolist() == [49406, 49407] and (empty[0, 2:] == 49407).all()
  batch = tok(["a", "a photo of a cat", LONG[0]], context_length=16)
  assert batch.shape == (3, 16)
  assert [len(up_to_eot(r)) for r in batch] == [3, 7, 16]


def test_encode_has_no_special_tokens_or_padding(open_clip_tok):
  tok = tokenizer_lib.Tokenizer.default()
  for text in ["a photo of a", "ＦＵＬＬＷＩＤＴＨ &amp; “quotes”", "", LONG[0]]:
    assert tok.encode(text) == open_clip_tok.encode(text), text
  assert len(tok.encode(LONG[0])) == 100


@pytest.mark.parametrize("which", ["vocab", "json"])
def test_from_pretrained_folders_give_identical_ids(which, vocab_folder, json_folder):
  folder = vocab_folder if which == "vocab" else json_folder
  assert (folder / ("vocab.json" if which == "vocab" else "tokenizer.json")).is_file()
  loaded = tokenizer_lib.Tokenizer.from_pretrained(folder)
  assert (loaded.sot_token_id, loaded.eot_token_id, loaded.pad_token_id) == (49406, 49407, 49407)
  np.testing.assert_array_equal(loaded(ALL), tokenizer_lib.Tokenizer.default()(ALL))


def test_transformers_reads_written_special_tokens(hf_tok):
  assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (49406, 49407, 49407)
  assert hf_tok.model_max_length == 77


@pytest.mark.parametrize("where", ["tokenizer_config.json", "special_tokens_map.json"])
def test_pad_token_read_from_folder(where, tmp_path, vocab_folder):
  for name in ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]:
    (tmp_path / name).write_bytes((vocab_folder / name).read_bytes())
  config = json.loads((tmp_path / where).read_text())
  config["pad_token"] = "!"
  (tmp_path / where).write_text(json.dumps(config))
  if where == "tokenizer_config.json":
    (tmp_path / "special_tokens_map.json").unlink()  # it would override the config (legacy precedence)
  ours = tokenizer_lib.Tokenizer.from_pretrained(tmp_path)
  hf = transformers.CLIPTokenizer.from_pretrained(tmp_path)
  assert ours.pad_token_id == hf.pad_token_id == 0
  # transformers also makes "!" a special token that splits "!!!" in texts; CLIP never did that, nor do we.
  texts = [t for t in PLAIN if "!" not in t]
  np.testing.assert_array_equal(ours(texts), hf_ids(hf, texts))


def test_folder_without_tokenizer_files_names_folder_and_files(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match=r"(?s)tokenizer\.json.*vocab\.json.*merges\.txt") as e:
    tokenizer_lib.Tokenizer.from_pretrained(tmp_path)
  assert str(tmp_path) in str(e.value) and "config.json" in str(e.value)
  with pytest.raises(FileNotFoundError, match="missing"):
    tokenizer_lib.Tokenizer.from_pretrained(tmp_path / "missing")
