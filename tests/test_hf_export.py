"""amos-export: our checkpoints load in transformers / sentence-transformers and give
our logits, embeddings and token ids; the export re-imports to the same params."""
from __future__ import annotations

import json
import os
import stat

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentence_transformers
import torch
import transformers
from flax import nnx

from amos_jax import cli
from amos_jax.data import corpus
from amos_jax.data.tokenizer import train_sentencepiece
from amos_jax.errors import ExportError
from amos_jax.hf import export, load
from amos_jax.model.heads import mean_pool
from amos_jax.objectives import get_objective
from amos_jax.objectives.base import SpecialTokens
from amos_jax.train import checkpoint as ckpt
from amos_jax.train.state import TrainState, make_optimizer
from helpers import tiny_config

TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "  Ｆｕｌｌ-width text,   extra   spaces and café naïve!  ",
         "Numbers 1234 and 3.14, tabs\tand\nnew lines.",
         "Alabama is a state in the southeastern region of the United States."]


@pytest.fixture(scope="module")
def tokenizer():
  return train_sentencepiece(corpus.demo_documents()[:40], vocab_size=300)


def make_run(tmp_path, tokenizer, objective, sharing=None, **model):
  """A run directory as amos-train leaves it: config.json, tokenizer/, checkpoints/.

  Every param (GDES's E_delta too) is moved off its init, so a swapped or dropped
  tensor would show.
  """
  config = tiny_config(objective, vocab_size=tokenizer.vocab_size, **model)
  if objective == "amos":
    config.objective.generator.tap_layers = (1, 2)
  if sharing:
    config.objective.embedding_sharing = sharing
  obj = get_objective(config, SpecialTokens.of(tokenizer))
  model = obj.build_model(nnx.Rngs(3))
  graphdef, params = nnx.split(model, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(7), 512))
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), params)
  workdir = tmp_path / f"run_{objective}_{sharing or 'default'}"
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


def _flat(params):
  return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(params)}


def _import_back(path, config, seed=99):
  obj = get_objective(config)
  _, fresh = nnx.split(obj.build_model(nnx.Rngs(seed)), nnx.Param)
  back, report = load.init_params_from_hf(f"hf:{path}", fresh, obj)
  return _flat(back), report


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


@pytest.mark.parametrize("objective,sharing", [("electra", "all"), ("amos", "tokens")])
def test_discriminator_and_generators_export(tmp_path, tokenizer, objective, sharing):
  """ELECTRA shares the whole embedding block; AMOS ('tokens') only the token matrix,
  so its generators carry their own position/type embeddings and LayerNorm."""
  workdir, config, graphdef, params = make_run(tmp_path, tokenizer, objective, sharing)
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
  flat = _flat(params)
  for folder, depth in depths.items():
    path = os.path.join(out, folder)
    gen = transformers.AutoModelForMaskedLM.from_pretrained(path).eval()
    assert type(gen).__name__ == "ElectraForMaskedLM"
    assert gen.config.num_hidden_layers == depth
    emb = gen.electra.embeddings
    own = "generator" if sharing == "tokens" else "discriminator"
    np.testing.assert_array_equal(emb.position_embeddings.weight.detach().numpy(),
                                  flat[(own, "embeddings", "position_embeddings",
                                        "embedding")])
    np.testing.assert_array_equal(emb.LayerNorm.bias.detach().numpy(),
                                  flat[(own, "embeddings", "LayerNorm", "bias")])
    np.testing.assert_array_equal(emb.word_embeddings.weight.detach().numpy(),
                                  flat[("discriminator", "embeddings", "word_embeddings",
                                        "embedding")])

    def fn(m, i, s, depth=depth):
      h = m.generator(i, s, num_layers=depth)[-1]
      return m.generator_head(h, m.generator.word_embeddings)
    _close(_ours(graphdef, params, fn, ids, mask), _theirs(gen, ids, mask), mask)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert tok(TEXTS[0])["input_ids"] == [tokenizer.cls_id] + tokenizer.encode(
        TEXTS[0])[0] + [tokenizer.sep_id]
    # Each generator folder is a complete fill-mask model, tokenizer included.
    fill = transformers.pipeline("fill-mask", model=path, device="cpu")
    guesses = fill("The quick brown [MASK] jumps over the lazy dog.", top_k=3)
    assert len(guesses) == 3 and all("token_str" in g for g in guesses)

  # The export imports back into the same objective: every exported tensor returns.
  back, report = _import_back(out, config)
  assert report["folders"] == [max(depths, key=depths.get)]
  for path, value in flat.items():
    if path[0] == "mixture":  # training-only; not part of any transformers model
      assert "mixture/kernel" in report["initialized"]
      continue
    np.testing.assert_allclose(back[path], value, atol=1e-6, err_msg=str(path))

  # And across objectives: an ELECTRA run of the same generator size reads AMOS's
  # deepest generator_layer<N>, an AMOS run ELECTRA's generator/.
  other = tiny_config("amos" if objective == "electra" else "electra",
                      vocab_size=tokenizer.vocab_size)
  other.objective.update(embedding_sharing=sharing, rtd_head_layers=2)
  other.objective.generator.update(width_fraction=config.objective.generator.width_fraction,
                                   num_layers=2, tap_layers=(1, 2))
  back, report = _import_back(out, other)
  assert report["folders"] == [max(depths, key=depths.get)]
  for path, value in back.items():
    if path[0] in ("generator", "generator_head"):
      np.testing.assert_allclose(value, flat[path], atol=1e-6, err_msg=str(path))


def test_gdes_exports_the_sum_to_the_discriminator(tmp_path, tokenizer):
  """GDES: the discriminator reads E_G + E_delta, the generator E_G; so do the exports."""
  workdir, config, graphdef, params = make_run(tmp_path, tokenizer, "electra", "gdes")
  flat = _flat(params)
  e_g = flat[("discriminator", "embeddings", "word_embeddings", "embedding")]
  delta = flat[("discriminator", "embeddings", "word_embeddings_delta")]
  assert np.abs(delta).min() > 0
  out = str(tmp_path / "out")
  export.main(["--workdir", workdir, "--out", out])
  disc = transformers.AutoModelForPreTraining.from_pretrained(out).eval()
  gen = transformers.AutoModelForMaskedLM.from_pretrained(os.path.join(out, "generator"))
  np.testing.assert_allclose(disc.electra.embeddings.word_embeddings.weight.detach().numpy(),
                             e_g + delta, atol=1e-6)
  np.testing.assert_allclose(gen.electra.embeddings.word_embeddings.weight.detach().numpy(),
                             e_g, atol=1e-6)
  ids, mask = _batch(tokenizer)
  ours = _ours(graphdef, params,
               lambda m, i, s: m.discriminator_head(m.discriminator(i, s)[-1]), ids, mask)
  _close(ours, _theirs(disc, ids, mask), mask)
  with open(os.path.join(out, "model.safetensors"), "rb") as f:
    assert b"delta" not in f.read(4096)  # folded, not carried along


def test_sentence_transformers_export_gives_our_embeddings(tmp_path, tokenizer):
  st = sentence_transformers
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
  with pytest.raises(ExportError, match="relative position bias"):
    export.main(["--workdir", workdir, "--out", str(tmp_path / "out")])
  assert not os.path.exists(tmp_path / "out")


# ------------------------------------------------------------ the output folder
@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory, tokenizer):
  return make_run(tmp_path_factory.mktemp("mlm_run"), tokenizer, "mlm")[0]


def _tree(path):
  return {os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), "rb").read()
          for d, _, files in os.walk(path) for f in files}


def test_out_inside_the_workdir_is_refused(mlm_run):
  """--out = the workdir would write over the run's config.json."""
  before = _tree(mlm_run)
  for out in (mlm_run, os.path.join(mlm_run, "export"), mlm_run + "/./"):
    with pytest.raises(ExportError, match="inside the run --workdir"):
      export.main(["--workdir", mlm_run, "--out", out])
  assert _tree(mlm_run) == before


def test_out_that_cannot_be_written_is_one_line(tmp_path, mlm_run, capsys):
  (tmp_path / "a_file").write_text("x")
  with pytest.raises(ExportError, match="a_file is a file"):
    export.main(["--workdir", mlm_run, "--out", str(tmp_path / "a_file" / "out")])
  with pytest.raises(ExportError, match="is a file"):
    export.main(["--workdir", mlm_run, "--out", str(tmp_path / "a_file")])
  # Refused by the kernel (a read-only sysfs), whoever runs the test.
  with pytest.raises(ExportError, match="cannot write"):
    export.main(["--workdir", mlm_run, "--out", "/sys/amos_export_test/out"])
  # The command prints the one line and exits with status 2.
  with pytest.raises(SystemExit) as e:
    cli.export_main(["--workdir", mlm_run, "--out", str(tmp_path / "a_file" / "out")])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: --out ") and "a_file" in err[0]


def test_out_never_replaces_a_folder_it_did_not_write(tmp_path, mlm_run):
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("keep me")
  with pytest.raises(ExportError, match="did not write"):
    export.main(["--workdir", mlm_run, "--out", str(mine)])
  assert _tree(mine) == {"notes.txt": b"keep me"}

  out = tmp_path / "out"
  export.main(["--workdir", mlm_run, "--out", str(out)])
  first = _tree(out)
  export.main(["--workdir", mlm_run, "--out", str(out)])  # an earlier export is replaced
  assert _tree(out).keys() == first.keys()
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no staging left
  (out / "notes.txt").write_text("mine now")
  with pytest.raises(ExportError, match="did not write"):
    export.main(["--workdir", mlm_run, "--out", str(out)])
  assert (out / "notes.txt").read_text() == "mine now"
  empty = tmp_path / "empty"
  empty.mkdir()
  export.main(["--workdir", mlm_run, "--out", str(empty)])
  assert (empty / "model.safetensors").is_file()


def test_size_and_pooling_apply_to_sentence_transformers_only(tmp_path, mlm_run):
  for flags in (["--size", "1,16"], ["--pooling", "cls"]):
    with pytest.raises(ExportError, match="applies to --format sentence-transformers"):
      export.main(["--workdir", mlm_run, "--out", str(tmp_path / "out"), *flags])
  assert not os.path.exists(tmp_path / "out")


def test_exported_files_have_normal_modes(tmp_path, mlm_run):
  """0644 files and 0755 folders under umask 022 (safetensors alone writes 0600)."""
  old = os.umask(0o022)
  try:
    out = tmp_path / "out"
    export.main(["--workdir", mlm_run, "--out", str(out)])
  finally:
    os.umask(old)
  assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
  modes = {os.path.relpath(os.path.join(d, f), out): stat.S_IMODE(
      os.stat(os.path.join(d, f)).st_mode) for d, _, files in os.walk(out) for f in files}
  assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes
