"""amos-eval glue: the classify objective and GLUE-layout data learn a separable task,
resume exactly after an interruption, score with NumPy metrics that equal
hand-worked examples and scipy, and refuse bad input with one line."""
from __future__ import annotations

import json
import os
import random
import signal

import numpy as np
import pytest

from amos_jax.eval import metrics

WORDS = ["alpha", "bravo", "delta", "echo", "golf", "hotel", "india", "kilo", "lima",
         "mike", "oscar", "papa", "romeo", "sierra", "tango", "victor"]
KEYWORD = "zulu"

# A 1-layer, 32-wide encoder: compiles in seconds on a CPU.
TINY = [
    "--config.train.seq_len=24", "--config.train.batch_size=16",
    "--config.train.learning_rate=5e-3", "--config.train.log_every=5", "--pooling=mean",
    "--config.checkpoint.every=10", "--config.model.hidden_dropout=0.0",
    "--config.model.attention_dropout=0.0",
]


def _write_task(d, n_train=192, n_dev=64, label_col="label"):
  """Pairs whose label is whether sentence2 holds the keyword (yes/no)."""
  rnd = random.Random(0)
  os.makedirs(d, exist_ok=True)
  for name, n in (("train", n_train), ("dev", n_dev)):
    lines = [f"index\tsentence1\tsentence2\t{label_col}"]
    for i in range(n):
      a = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(3, 6)))
      b = [rnd.choice(WORDS) for _ in range(rnd.randint(3, 6))]
      yes = i % 2 == 0
      if yes:
        b.insert(rnd.randrange(len(b) + 1), KEYWORD)
      lines.append(f"{i}\t{a}\t{' '.join(b)}\t{'yes' if yes else 'no'}")
    (d / f"{name}.tsv").write_text("\n".join(lines) + "\n")
  return str(d)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A task and a freshly initialized 1-layer BERT written as a transformers folder
  (the layout amos-export writes) with a sentencepiece tokenizer trained on the task."""
  from flax import nnx
  from amos_jax import config as config_lib
  from amos_jax.data.tokenizer import train_sentencepiece
  from amos_jax.hf.export import export_hf
  from amos_jax.model.encoder import EncoderConfig
  from amos_jax.objectives import get_objective
  from amos_jax.objectives.base import SpecialTokens
  from amos_jax.objectives.mlm import MaskedLanguageModel
  root = tmp_path_factory.mktemp("glue")
  task = _write_task(root / "task")
  rows = [l.split("\t") for l in (root / "task" / "train.tsv").read_text().splitlines()[1:]]
  tok = train_sentencepiece([f"{r[1]} {r[2]}" for r in rows], vocab_size=40)
  c = config_lib.base_config()
  c.model.update(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64,
                 embedding_size=32, vocab_size=tok.vocab_size, max_position_embeddings=32)
  c.objective.update(name="mlm", mask_scheme="bert")
  model = MaskedLanguageModel(EncoderConfig.from_config(c.model), rngs=nnx.Rngs(0))
  flat = {tuple(p): np.asarray(v[...])
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  objective = get_objective(config_lib.freeze(c), SpecialTokens.of(tok))
  folder = str(root / "bert")
  os.makedirs(folder)
  export_hf(objective.hf_models(), objective.export_params(flat), tok, folder,
            lambda *a, **k: "a test model\n")
  tok.save(folder)   # the sentencepiece model beside transformers' tokenizer.json
  return root, task, f"hf:{folder}"


def _glue(*argv) -> int:
  from amos_jax.eval.cli import eval_main
  return eval_main(["glue", *argv])


def _results(out) -> dict:
  name = [f for f in os.listdir(out) if f.startswith("glue-") and f.endswith(".json")]
  with open(os.path.join(out, name[0])) as f:
    return json.load(f)


def _train_rows(workdir) -> dict:
  """{step: logged metrics} without the timings."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        out.setdefault(row.pop("step"), {}).update(
            {k: v for k, v in row.items() if k not in ("step_time", "tokens_per_sec")})
  return out


@pytest.fixture
def compile_cache(tmp_path):
  """A persistent compilation cache for this test: the three runs compile once."""
  import jax
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  before = {k: getattr(jax.config, k) for k in keys}
  for k, v in zip(keys, (str(tmp_path / "xla_cache"), 0.0, 0)):
    jax.config.update(k, v)
  _reset_compile_cache()
  yield
  for k, v in before.items():
    jax.config.update(k, v)
  _reset_compile_cache()   # later tests must not write into this test's folder


def _reset_compile_cache():
  """JAX opens its persistent cache once per process; make it re-read the config."""
  try:
    from jax._src import compilation_cache
    compilation_cache.reset_cache()
  except (ImportError, AttributeError):
    pass


def test_glue_learns_and_resumes_exactly(tiny_run, monkeypatch, compile_cache):
  """The tiny encoder learns the keyword task far above chance; a run stopped by
  SIGTERM at step 12 and rerun equals the uninterrupted run (metrics and dev figures)."""
  from amos_jax.data import glue as glue_data
  root, task, model = tiny_run
  flags = ["--model", model, "--task", task, *TINY, "--config.train.steps=40"]
  full = str(root / "full")
  assert _glue(*flags, "--out", full) == 0
  res = _results(full)
  assert res["kind"] == "classification" and res["labels"] == ["no", "yes"]
  row = res["results"][0]
  assert row["step"] == 40
  assert row["accuracy"] >= 85.0, row  # chance is 50
  assert set(row) == {"seed", "step", "accuracy", "f1", "mcc"}

  cut = str(root / "cut")
  original = glue_data.LabeledBatches.batch

  def batch(self, step):
    if step == 12:
      os.kill(os.getpid(), signal.SIGTERM)   # the trainer saves and stops
    return original(self, step)

  monkeypatch.setattr(glue_data.LabeledBatches, "batch", batch)
  assert _glue(*flags, "--out", cut) == 2    # stopped early: one error line
  monkeypatch.setattr(glue_data.LabeledBatches, "batch", original)
  assert not any(f.endswith(".json") for f in os.listdir(cut))
  assert _glue(*flags, "--out", cut) == 0
  assert _results(cut)["results"] == res["results"]
  # The resumed run logs on its own cadence from step 14: equal where both logged.
  a, b = (_train_rows(os.path.join(d, "seed1")) for d in (cut, full))
  common = sorted(set(a) & set(b))
  assert len(common) >= 5 and max(common) == 40
  assert all(a[s] == b[s] for s in common)


def test_glue_metrics_against_hand_worked_and_scipy():
  # 4 TP, 1 FP, 2 FN, 3 TN (hand-worked): accuracy 0.7, F1 = 8 / 11,
  # MCC = (4*3 - 1*2) / sqrt(5 * 6 * 4 * 5) = 10 / sqrt(600).
  y = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0])
  p = np.array([1, 1, 1, 1, 0, 0, 1, 0, 0, 0])
  assert metrics.accuracy(y, p) == pytest.approx(0.7)
  assert metrics.binary_f1(y, p) == pytest.approx(8 / 11)
  assert metrics.matthews_corrcoef(y, p) == pytest.approx(10 / np.sqrt(600))
  # Three classes: C = [[2,1,0],[0,2,1],[1,0,1]] (rows gold); c=5, s=8,
  # t=(3,3,2), p=(3,3,2): (5*8 - 22) / (64 - 22) = 18 / 42.
  y3 = np.array([0, 0, 0, 1, 1, 1, 2, 2])
  p3 = np.array([0, 0, 1, 1, 1, 2, 0, 2])
  assert metrics.matthews_corrcoef(y3, p3) == pytest.approx(18 / 42)
  assert metrics.matthews_corrcoef(y, np.ones_like(y)) == 0.0   # undefined -> 0
  assert metrics.binary_f1(np.zeros(3), np.zeros(3)) == 0.0
  scores = metrics.glue_scores(y, np.eye(2)[p] * 3.0, regression=False)
  assert scores == pytest.approx(dict(accuracy=70.0, f1=800 / 11,
                                      mcc=1000 / np.sqrt(600)))
  from scipy import stats
  rnd = np.random.default_rng(0)
  gold = rnd.integers(0, 6, 200).astype(float)   # ties, as STS-B scores have
  pred = gold + rnd.normal(0, 2, 200)
  reg = metrics.glue_scores(gold, pred, regression=True)
  assert reg["pearson"] == pytest.approx(100 * stats.pearsonr(gold, pred)[0], abs=1e-9)
  assert reg["spearman"] == pytest.approx(100 * stats.spearmanr(gold, pred)[0], abs=1e-9)


def test_glue_task_reading(tmp_path):
  from amos_jax.data.glue import load_task
  d = tmp_path / "sts"
  d.mkdir()
  body = "sentence1\tsentence2\tscore\na b\tc d\t3.800\ne f\tg h\t1.000\ni\tj\n"
  (d / "train.tsv").write_text(body)
  (d / "dev.tsv").write_text(body)
  t = load_task(str(d))
  assert t.regression and t.num_labels == 1 and t.splits["train"].skipped == 1
  assert t.label_values("dev").tolist() == pytest.approx([3.8, 1.0])
  d2 = tmp_path / "single"
  d2.mkdir()
  (d2 / "train.tsv").write_text("sentence\tlabel\nx y\t1\nz\t0\n")
  (d2 / "dev.tsv").write_text("sentence\tlabel\nx\t0\n")
  t = load_task(str(d2))
  assert t.text_columns == ("sentence",) and t.label_names == ["0", "1"]


def test_glue_bad_input_is_one_line(tmp_path, capsys):
  task = _write_task(tmp_path / "task", n_train=8, n_dev=4)
  os.remove(os.path.join(task, "dev.tsv"))
  assert _glue("--model", f"hf:{tmp_path}", "--task", task) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "dev.tsv" in err[0] and err[0].startswith("error: ")
  nolabel = _write_task(tmp_path / "nolabel", n_train=8, n_dev=4, label_col="gold")
  assert _glue("--model", f"hf:{tmp_path}", "--task", nolabel) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "label column" in err[0]
  good = _write_task(tmp_path / "good", n_train=8, n_dev=4)
  assert _glue("--model", str(tmp_path / "nowhere"), "--task", good) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "workdir" in err[0]
  assert _glue("--model", str(tmp_path / "nowhere"), "--task", good,
               "--seeds", "1,x") == 2
  assert "--seeds" in capsys.readouterr().err
