"""Our tokenizers as Hugging Face tokenizer files (`tokenizer.json` and friends).

`AutoTokenizer.from_pretrained(OUT)` then gives our ids: WordPiece through
`tokenizers`' own BERT pipeline, sentencepiece models rebuilt as a `tokenizers`
Unigram (or BPE) model with sentencepiece's normalizer (its precompiled NFKC
charsmap) and metaspace pre-tokenizer. Special tokens become [CLS] ... [SEP].
One known difference: a literal "[MASK]" typed in text is the mask token for
transformers, while our sentencepiece models read it as plain characters.
"""
from __future__ import annotations

import json
import os

from amos_jax.data.tokenizer import (SPECIAL_TOKENS, SentencePieceTokenizer, Tokenizer,
                                     WordPieceTokenizer)
from amos_jax.errors import ExportError

SPECIAL_NAMES = ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token")


def _sentencepiece_to_tokenizers(tok: SentencePieceTokenizer):
  """A `tokenizers.Tokenizer` that segments text as the sentencepiece model does."""
  from sentencepiece import sentencepiece_model_pb2
  from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer
  from tokenizers import decoders, models, normalizers, pre_tokenizers

  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(tok._proto)
  norm, trainer = proto.normalizer_spec, proto.trainer_spec
  vocab = [(p.piece, p.score) for p in proto.pieces]
  if trainer.model_type == trainer.UNIGRAM:
    model = models.Unigram(vocab, unk_id=tok.unk_id, byte_fallback=trainer.byte_fallback)
  elif trainer.model_type == trainer.BPE:
    # sentencepiece BPE merges the pair whose result has the highest score.
    ids = {p: i for i, (p, _) in enumerate(vocab)}
    merges = []
    for piece, _ in vocab:
      for k in range(1, len(piece)):
        a, b = piece[:k], piece[k:]
        if a in ids and b in ids:
          merges.append((ids[piece], ids[a], ids[b], a, b))
    merges.sort()
    model = models.BPE({p: i for p, i in ids.items()}, [(a, b) for *_, a, b in merges],
                       unk_token=SPECIAL_TOKENS[1], fuse_unk=True,
                       byte_fallback=trainer.byte_fallback)
  else:
    raise ExportError("only unigram and bpe sentencepiece models convert to "
                      "tokenizer.json")
  out = HFTokenizer(model)
  steps = []
  if norm.precompiled_charsmap:
    steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
  if norm.remove_extra_whitespaces:
    steps += [normalizers.Strip(left=True, right=True),
              normalizers.Replace(Regex(" {2,}"), " ")]
  steps.append(normalizers.Replace(" ", "\u2581"))
  out.normalizer = normalizers.Sequence(steps)
  scheme = "always" if norm.add_dummy_prefix else "never"
  out.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581",
                                               prepend_scheme=scheme, split=True)
  out.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme=scheme)
  out.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t in SPECIAL_TOKENS])
  return out


def _post_processor(tok: Tokenizer):
  from tokenizers import processors
  cls, sep = SPECIAL_TOKENS[2], SPECIAL_TOKENS[3]
  return processors.TemplateProcessing(
      single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
      special_tokens=[(cls, tok.cls_id), (sep, tok.sep_id)])


def save_hf_tokenizer(tok: Tokenizer, out_dir: str, model_max_length: int = 512) -> None:
  """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
  os.makedirs(out_dir, exist_ok=True)
  special = dict(zip(SPECIAL_NAMES, SPECIAL_TOKENS))
  config = dict(model_max_length=model_max_length, clean_up_tokenization_spaces=False,
                **special)
  if isinstance(tok, WordPieceTokenizer):
    from tokenizers import BertWordPieceTokenizer
    hf = BertWordPieceTokenizer(tok._vocab_path, lowercase=tok.lowercase)._tokenizer
    with open(tok._vocab_path, "rb") as f, open(os.path.join(out_dir, "vocab.txt"),
                                                "wb") as g:
      g.write(f.read())
    config.update(tokenizer_class="BertTokenizer", do_lower_case=tok.lowercase)
  elif isinstance(tok, SentencePieceTokenizer):
    hf = _sentencepiece_to_tokenizers(tok)
    config.update(tokenizer_class="PreTrainedTokenizerFast")
  else:
    raise ExportError(f"cannot convert a {type(tok).__name__} tokenizer to tokenizer.json")
  hf.post_processor = _post_processor(tok)
  hf.save(os.path.join(out_dir, "tokenizer.json"))
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
    json.dump(special, f, indent=2)
