"""Tokenizers: special ids, determinism, round trip on real text, WordPiece parity."""
import os
import re

import pytest

from amos_jax.data import corpus
from amos_jax.data import tokenizer as tk
from amos_jax.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def docs():
  return corpus.demo_documents()


@pytest.fixture(scope="module")
def sp_bpe(docs):
  return tk.train_sentencepiece(docs, vocab_size=4000, model_type="bpe")


def _sentences(docs, n=300):
  sents = [s for d in docs[::7] for s in re.split(r"(?<=[.!?])\s+", d) if len(s) > 20]
  return sents[:n]


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_special_ids_and_vocab_size(docs, model_type):
  tok = tk.train_sentencepiece(docs[:60], vocab_size=2000, model_type=model_type)
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
  assert tok.vocab_size == 2000
  # Control symbols are never produced from text.
  ids, _ = tok.encode("a [MASK] and a [CLS] in the text")
  assert not set(ids) & {0, 2, 3, 4}


def test_training_is_deterministic(docs, sp_bpe):
  again = tk.train_sentencepiece(docs, vocab_size=4000, model_type="bpe")
  assert again.fingerprint == sp_bpe.fingerprint
  other = tk.train_sentencepiece(docs[::2], vocab_size=4000, model_type="bpe")
  assert other.fingerprint != sp_bpe.fingerprint


def test_round_trip_on_real_text(docs, sp_bpe):
  sents = _sentences(docs)
  exact, unk = 0, 0
  for s in sents:
    ids, starts = sp_bpe.encode(s)
    assert len(ids) == len(starts) > 0 and starts[0]
    if sp_bpe.unk_id in ids:
      unk += 1
      continue
    assert sp_bpe.decode(ids) == sp_bpe.normalize(s)
    exact += 1
  assert exact >= 0.9 * len(sents), (exact, unk)


def test_word_starts_mark_each_word_once(sp_bpe):
  text = "the committee considered several unprecedented constitutional amendments"
  ids, starts = sp_bpe.encode(text)
  assert sum(starts) == len(text.split())
  assert len(ids) > len(text.split())  # some words really are split into pieces
  batch = sp_bpe.encode_batch([text, "", "hello"])
  assert batch[0] == (ids, starts) and batch[1] == ([], [])


def test_save_and_load(tmp_path, sp_bpe):
  d = sp_bpe.save(str(tmp_path / "tok"))
  for spec in (d, os.path.join(d, "spm.model"), "sentencepiece:" + os.path.join(d, "spm.model")):
    tok = tk.load_tokenizer(spec)
    assert tok.fingerprint == sp_bpe.fingerprint
    assert tok.encode("Sydney is a city.") == sp_bpe.encode("Sydney is a city.")
  with pytest.raises(DataError, match="^tokenizer not found"):
    tk.load_tokenizer(str(tmp_path / "missing"))
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a model")
  with pytest.raises(DataError, match=f"^{bad} is not a sentencepiece model"):
    tk.load_tokenizer(str(bad))
  (tmp_path / "broken").mkdir()
  (tmp_path / "broken" / tk.CONFIG_FILE).write_text("{not json")
  with pytest.raises(DataError, match="corrupt tokenizer config"):
    tk.load_tokenizer(str(tmp_path / "broken"))


def test_empty_corpus_is_an_error():
  with pytest.raises(DataError, match="empty corpus"):
    tk.train_sentencepiece(["", "  \n"], vocab_size=100)


def test_vocab_size_errors_give_the_right_advice():
  """Too small says raise it, too large says lower it, each naming the caller's key;
  a hopeless value is refused before training."""
  text = ["hello world this is text", "another line of words here"]
  for size in (0, 5, -1):
    with pytest.raises(ConfigError, match=f"^model.vocab_size={size} is too small") as e:
      tk.train_sentencepiece(text, vocab_size=size, vocab_flag="model.vocab_size")
    assert "lower" not in str(e.value)
  with pytest.raises(ConfigError, match="^vocab_size=8 is smaller than the corpus's "
                     r"characters need; raise it to at least \d+$"):
    tk.train_sentencepiece(text, vocab_size=8)
  with pytest.raises(ConfigError, match="^vocab_size=9000 is too large for this corpus; "
                     r"lower it to at most \d+ or give more text$"):
    tk.train_sentencepiece(text, vocab_size=9000)
  with pytest.raises(ConfigError, match="model_type must be"):
    tk.train_sentencepiece(text, vocab_size=30, model_type="char")


# -------------------------------------------------------------------- WordPiece
_BERT_LIKE = (["[PAD]"] + [f"[unused{i}]" for i in range(3)] +
              ["[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "un", "##aff", "##able",
               ",", ".", "sat", "'", "s", "a"])


def test_wordpiece_known_ids(tmp_path):
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(_BERT_LIKE) + "\n")
  tok = tk.load_tokenizer(str(vocab))
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 4, 5, 6, 7)
  ids, starts = tok.encode("The unaffable cat, sat.")
  assert [_BERT_LIKE[i] for i in ids] == ["the", "un", "##aff", "##able", "cat", ",", "sat", "."]
  assert starts == [True, True, False, False, True, True, True, True]
  assert tok.decode(ids) == "the unaffable cat, sat."


def test_wordpiece_matches_tokenizers_library(tmp_path, docs):
  from tokenizers import BertWordPieceTokenizer
  trainer = BertWordPieceTokenizer(lowercase=True)
  trainer.train_from_iterator(docs[:100], vocab_size=3000, show_progress=False)
  trainer.save_model(str(tmp_path))
  vocab = str(tmp_path / "vocab.txt")
  ours = tk.load_tokenizer(vocab)
  ref = BertWordPieceTokenizer(vocab, lowercase=True)
  texts = _sentences(docs[100:], n=100)
  for text, (ids, starts) in zip(texts, ours.encode_batch(texts)):
    enc = ref.encode(text, add_special_tokens=False)
    assert ids == enc.ids
    # A word start is where the library's word index changes.
    expect = [i == 0 or enc.word_ids[i] != enc.word_ids[i - 1] for i in range(len(ids))]
    assert starts == expect
  saved = tk.load_tokenizer(ours.save(str(tmp_path / "saved")))
  assert saved.fingerprint == ours.fingerprint and saved.kind == "wordpiece"
