"""amos-export: our checkpoints load in transformers / sentence-transformers and give
our logits, embeddings and token ids; the export re-imports to the same params."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from amos_jax.data import corpus
from amos_jax.data.tokenizer import train_sentencepiece
from amos_jax.hf import export, load
from amos_jax.model.heads import mean_pool
from amos_jax.objectives import get_objective
from amos_jax.train import checkpoint as ckpt
from amos_jax.train.state import TrainState, make_optimizer
from helpers import tiny_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "  Ｆｕｌｌ-width text,   extra   spaces and café naïve!  ",
         "Numbers 1234 and 3.14, tabs\tand\nnew lines.",
         "Alabama is a state in the southeastern region of the United States."]


@pytest.fixture(scope="module")
def tokenizer():
  return train_sentencepiece(corpus.demo_documents()[:40], vocab_size=300)


def make_run(tmp_path, tokenizer, objective, **model):
  """A run directory as amos-train leaves it: config.json, tokenizer/, checkpoints/."""
  config = tiny_config(objective, vocab_size=tokenizer.vocab_size, **model)
  if objective == "amos":
    config.objective.generator.tap_layers = (1, 2)
  obj = get_objective(objective)
  model = obj.build_model(config, nnx.Rngs(3))
  graphdef, params = nnx.split(model, nnx.Param)
  # Non-trivial LayerNorms and biases, so a swapped or dropped tensor would show.
  keys = iter(jax.random.split(jax.random.key(7), 512))
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), params)
  workdir = tmp_path / f"run_{objective}"
  os.makedirs(workdir)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  tokenizer.save(str(workdir / "tokenizer"))
  (workdir / "metrics.jsonl").write_text(json.dumps({"step": 3, "loss": 1.5}) + "\n")
  tx = make_optimizer(config.train)
  state = TrainState(step=jnp.array(3, jnp.int32), params=params, opt_state=tx.init(params),
                     nonfinite_streak=jnp.array(0, jnp.int32))
  manager = ckpt.make_manager(str(workdir), config)
  ckpt.save(manager, 3, state, force=True)
  manager.wait_until_finished()
  manager.close()
  return str(workdir), config, graphdef, params


def _batch(tokenizer, texts=TEXTS):
  hf_style = [[tokenizer.cls_id] + tokenizer.encode(t)[0][:30] + [tokenizer.sep_id]
              for t in texts]
  t = max(map(len, hf_style))
  ids = np.zeros((len(texts), t), np.int64)
  mask = np.zeros_like(ids)
  for i, row in enumerate(hf_style):
    ids[i, :len(row)], mask[i, :len(row)] = row, 1
  return ids, mask


def _ours(graphdef, params, fn, ids, mask):
  return np.asarray(jax.jit(lambda p, i, m: fn(nnx.merge(graphdef, p), i, m))(
      params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))


def _theirs(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def _close(a, b, mask):
  m = mask > 0 if a.ndim == 2 else (mask > 0)[..., None]
  diff = np.abs(np.where(m, a - b, 0)).max()
  assert diff < 1e-4, diff
  return diff


def test_tokenizer_ids_equal(tmp_path, tokenizer):
  from amos_jax.hf.tokenizer_export import save_hf_tokenizer
  save_hf_tokenizer(tokenizer, str(tmp_path))
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  for text in TEXTS + corpus.demo_documents()[500:520]:
    text = text[:2000]
    assert hf(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)[0]
  assert hf("a b")["input_ids"][0] == tokenizer.cls_id
  assert hf("a b")["input_ids"][-1] == tokenizer.sep_id
  assert hf.pad_token_id == tokenizer.pad_id and hf.mask_token_id == tokenizer.mask_id


def test_mlm_exports_as_bert_for_masked_lm(tmp_path, tokenizer):
  workdir, config, graphdef, params = make_run(tmp_path, tokenizer, "mlm", embedding_size=32)
  out = str(tmp_path / "out")
  export.main(["--workdir", workdir, "--out", out])
  hf = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
  assert type(hf).__name__ == "BertForMaskedLM"
  ids, mask = _batch(tokenizer)

  def fn(model, i, m):
    return model.mlm_head(model.encoder(i, m)[-1], model.encoder.word_embeddings)
  ours = _ours(graphdef, params, fn, ids, mask)
  _close(ours, _theirs(hf, ids, mask), mask)
  hf.save_pretrained(tmp_path / "again")  # a loaded export saves and reloads
  again = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "again").eval()
  _close(ours, _theirs(again, ids, mask), mask)
  card = open(os.path.join(out, "README.md")).read()
  assert "objective: mlm" in card and "training steps: 3" in card and "loss" in card


@pytest.mark.parametrize("objective", ["electra", "amos"])
def test_discriminator_and_generators_export(tmp_path, tokenizer, objective):
  workdir, config, graphdef, params = make_run(tmp_path, tokenizer, objective)
  out = str(tmp_path / "out")
  export.main(["--workdir", workdir, "--out", out])
  ids, mask = _batch(tokenizer)

  disc = transformers.AutoModelForPreTraining.from_pretrained(out).eval()
  assert type(disc).__name__ == "ElectraForPreTraining"
  ours = _ours(graphdef, params,
               lambda m, i, s: m.discriminator_head(m.discriminator(i, s)[-1]), ids, mask)
  _close(ours, _theirs(disc, ids, mask), mask)

  depths = {"electra": {"generator": 2}, "amos": {"generator_layer1": 1,
                                                  "generator_layer2": 2}}[objective]
  for folder, depth in depths.items():
    gen = transformers.AutoModelForMaskedLM.from_pretrained(os.path.join(out, folder)).eval()
    assert type(gen).__name__ == "ElectraForMaskedLM"
    assert gen.config.num_hidden_layers == depth

    def fn(m, i, s, depth=depth):
      h = m.generator(i, s, num_layers=depth)[-1]
      return m.generator_head(h, m.discriminator.word_embeddings)
    _close(_ours(graphdef, params, fn, ids, mask), _theirs(gen, ids, mask), mask)
    tok = transformers.AutoTokenizer.from_pretrained(os.path.join(out, folder))
    assert tok(TEXTS[0])["input_ids"] == [tokenizer.cls_id] + tokenizer.encode(
        TEXTS[0])[0] + [tokenizer.sep_id]

  # The export imports back into the same objective: every exported tensor returns.
  model = get_objective(objective).build_model(config, nnx.Rngs(99))
  _, fresh = nnx.split(model, nnx.Param)
  back, report = load.init_params_from_hf(f"hf:{out}", fresh, config)
  flat_back, flat_orig = dict(nnx.to_flat_state(back)), dict(nnx.to_flat_state(params))
  for path, var in flat_orig.items():
    if path[0] == "mixture":  # training-only; not part of any transformers model
      assert "mixture/kernel" in report["initialized"]
      continue
    np.testing.assert_allclose(flat_back[path][...], var[...], atol=1e-6, err_msg=str(path))


def test_sentence_transformers_export_gives_our_embeddings(tmp_path, tokenizer):
  st = pytest.importorskip("sentence_transformers")
  workdir, config, graphdef, params = make_run(tmp_path, tokenizer, "mlm")
  ids, mask = _batch(tokenizer)
  for size in (None, (1, 16)):
    out = str(tmp_path / f"st_{size}")
    export.main(["--workdir", workdir, "--out", out, "--format", "sentence-transformers"]
                + (["--size", "1,16"] if size else []))
    model = st.SentenceTransformer(out, device="cpu")
    theirs = model.encode(TEXTS, convert_to_numpy=True)
    layer, dim = size or (2, 32)

    def fn(m, i, s, layer=layer, dim=dim):
      e = mean_pool(m.encoder(i, s)[layer], s)[:, :dim]
      return e / jnp.linalg.norm(e, axis=-1, keepdims=True)
    ours = _ours(graphdef, params, fn, ids, mask)
    assert theirs.shape == ours.shape
    assert (ours * theirs).sum(-1).min() > 0.99999
    np.testing.assert_allclose(theirs, ours, atol=1e-5)


def test_relative_position_bias_is_refused(tmp_path, tokenizer):
  workdir, *_ = make_run(tmp_path, tokenizer, "mlm", relative_attention_buckets=8)
  with pytest.raises(SystemExit, match="relative position bias"):
    export.main(["--workdir", workdir, "--out", str(tmp_path / "out")])
  assert not os.path.exists(tmp_path / "out")
