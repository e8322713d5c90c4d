"""Tiny SigLIP 2 tokenizer files for tests: a Gemma-format tokenizer.json trained here on a few phrases.

The real SigLIP 2 vocabulary (Gemma's, 256k ids) cannot be downloaded on the machines the tests run on; this file
has the same format and the same pipeline (byte-fallback BPE, spaces as "▁", no pre-tokenisation across "▁",
`<pad>`, `<eos>`, `<bos>`, `<unk>`, `<mask>` at ids 0..4 and the 256 byte tokens after them, `<eos>` appended by
the post-processor and `add_bos_token: false` / `add_eos_token: true` as in google/siglip2-*'s
tokenizer_config.json).
"""

from __future__ import annotations

import json
import pathlib

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
CORPUS = ["a photo of a bad quality image.", "good quality. perfect quality. fair quality. poor quality.",
          "x x x x", "animal artifacts blur noise jpeg compression", "a photo of a", "Good photo. Bad photo."]


def write_gemma_tokenizer(folder: str | pathlib.Path, vocab_size: int = 400) -> pathlib.Path:
  """Writes tokenizer.json + tokenizer_config.json (SigLIP 2's layout) into `folder`; returns it."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
  tok.normalizer = normalizers.Replace(" ", "▁")
  # SentencePiece never merges across a word boundary: split before each "▁" (Gemma's pieces start with it).
  tok.pre_tokenizer = pre_tokenizers.Split(Regex("▁"), behavior="merged_with_next")
  tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
  special = SPECIAL + [f"<0x{b:02X}>" for b in range(256)]
  tok.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                           show_progress=False))
  tok.post_processor = processors.TemplateProcessing(single="$A <eos>", pair="$A <eos> $B <eos>",
                                                     special_tokens=[("<eos>", 1)])
  tok.save(str(folder / "tokenizer.json"))
  config = dict(tokenizer_class="GemmaTokenizer", add_bos_token=False, add_eos_token=True, bos_token="<bos>",
                eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>", model_max_length=64)
  (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
  return folder


def write_tiny_siglip(folder: str | pathlib.Path, seed: int = 0, image_size: int = 32):
  """A tiny random `transformers.SiglipModel` written by transformers (config.json + model.safetensors, the real
  format), with the tokenizer above (64 text positions, as SigLIP 2); returns the torch model (eval mode).

  Weights are perturbed far from the initialisation, so the probe, biases and logit bias are all non-trivial."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  config = transformers.SiglipConfig(
      text_config=dict(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=64, projection_size=48),
      vision_config=dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
                         image_size=image_size, patch_size=8))
  torch.manual_seed(seed)
  model = transformers.SiglipModel(config).eval()
  gen = torch.Generator().manual_seed(seed)
  model.load_state_dict({k: (v + 0.2 * torch.randn(v.shape, generator=gen) if v.dtype.is_floating_point else v)
                         for k, v in model.state_dict().items()})
  with torch.no_grad():
    model.logit_bias.fill_(-2.5)  # a real SigLIP's is large and negative (about -10 at initialisation)
  model.save_pretrained(folder)
  write_gemma_tokenizer(folder)
  return model
