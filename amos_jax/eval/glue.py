"""amos-eval glue: fine-tune an encoder on a GLUE-layout task and score its dev set.

  amos-eval glue --model M --task DIR [--seeds 1,2,3] [--pooling cls|mean]
                 [--epochs 3] [--config.KEY=VALUE ...] [--out OUT]

The run is an ordinary `amos-train` run of the `classify` objective
(`objectives/classify.py`) on `data.task=DIR` (`data/glue.py`), through the same
trainer, sharding, Orbax checkpoints and metrics.jsonl, one workdir per seed
(OUT/seed<N>): a command interrupted (SIGTERM, preemption) saves its step, and the
same command again resumes there, as pre-training does; a finished seed is not
trained again.

Starting weights: hf:PATH is read by `init_from` (its size from config.json, its
WordPiece vocabulary as the tokenizer, as configs/continue.py does). A training
workdir (WORKDIR[@STEP]) has its encoder written once as a transformers folder
(OUT/init_model, the top folder `amos-export` would write) and read the same way;
its tokenizer is the run's.

Fine-tuning defaults (BERT's): batch 32, learning rate 2e-5 with 10% warmup then
linear decay, 3 epochs, sequence length 128, CLS pooling, dropout 0.1; every one a
`--config.KEY=VALUE` away. The dev set is then predicted whole and scored with NumPy
(`eval/metrics.glue_scores`): accuracy, F1 of label 1 (two labels) and Matthews
correlation, or Pearson and Spearman (regression), x100; with several seeds each
seed's figures and their median.
"""
from __future__ import annotations

import logging
import os

import ml_collections
import numpy as np

from amos_jax import paths
from amos_jax.errors import AmosError, CheckpointError, ConfigError, TrainingError, one_line

log = logging.getLogger("amos_jax")

INIT_FOLDER = "init_model"


def parse_seeds(text: str) -> list[int]:
  try:
    seeds = [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    raise ConfigError(f"--seeds {text!r}: give comma-separated integers, e.g. 1,2,3") \
        from None
  if not seeds or len(set(seeds)) != len(seeds):
    raise ConfigError(f"--seeds {text!r}: give distinct integers, e.g. 1,2,3")
  return seeds


def _workdir_source(ref, out: str) -> tuple[dict, str, str]:
  """(model section, tokenizer spec, hf folder) of a training workdir: its encoder
  written once as a transformers folder under OUT."""
  from amos_jax.hf.export import export_hf, load_run, load_run_tokenizer, model_card
  from amos_jax.objectives import get_objective
  from amos_jax.objectives.base import SpecialTokens
  try:
    config, flat, step = load_run(ref.path, ref.step)
    tok = load_run_tokenizer(ref.path, config)
  except AmosError as e:
    raise CheckpointError(f"--model {ref.path}: {one_line(e)}") from None
  except Exception as e:  # noqa: BLE001 - Orbax/tensorstore failures on unreadable files
    raise CheckpointError(f"--model {ref.path}: the checkpoint cannot be read "
                          f"({type(e).__name__}: {one_line(str(e))[:200]})") from None
  own = paths.join(ref.path, "tokenizer")
  tok_spec = own if paths.isdir(own) else config.data.tokenizer
  folder = os.path.join(out, INIT_FOLDER)
  stamp = os.path.join(folder, "source.txt")
  source = f"{os.path.abspath(ref.path)}@{step}"
  if not (os.path.isfile(stamp) and paths.read_text(stamp) == source):
    objective = get_objective(config, SpecialTokens.of(tok))
    models = objective.hf_models()
    if not models:
      raise CheckpointError(f"--model {ref.path}: objective {config.objective.name!r} "
                            "declares no transformers folder to start from")
    tmp = folder + ".tmp"
    if os.path.isdir(tmp):
      import shutil
      shutil.rmtree(tmp)
    os.makedirs(tmp)
    export_hf(models[:1], objective.export_params(flat), tok, tmp,
              model_card(config, ref.path, step))
    with open(os.path.join(tmp, "source.txt"), "w") as f:
      f.write(source)
    if os.path.isdir(folder):
      import shutil
      shutil.rmtree(folder)
    os.replace(tmp, folder)
  return dict(config.model), tok_spec, folder


def build_config(ref, task, out: str, overrides, pooling: str | None = None,
                 epochs: float = 3.0):
  """The classify config for `task` sized from the model reference (not frozen)."""
  from amos_jax.config import apply_overrides, base_config
  c = base_config()
  if ref.kind == "hf":
    from amos_jax.hf.load import hf_encoder_config, read_hf_config
    try:
      c.model.update(hf_encoder_config(ref.path))
      hf = read_hf_config(ref.path)
    except AmosError as e:
      raise CheckpointError(f"--model hf:{ref.path}: {one_line(e)}") from None
    c.model.hidden_dropout = float(hf.get("hidden_dropout_prob", 0.1))
    c.model.attention_dropout = float(hf.get("attention_probs_dropout_prob", 0.1))
    c.data.tokenizer = ref.path
    folder = ref.path
  else:
    model, tok_spec, folder = _workdir_source(ref, out)
    c.model.update({k: v for k, v in model.items() if k in c.model})
    c.data.tokenizer = tok_spec
  c.init_from = f"hf:{folder}"
  c.data.corpus = ""
  c.data.eval_fraction = 0.0
  c.data.task = task.directory
  c.data.text_columns = ",".join(task.text_columns)
  c.data.label_column = task.label_column
  c.objective = ml_collections.ConfigDict(dict(
      name="classify", num_labels=task.num_labels, pooling=pooling or "cls",
      classifier_dropout=-1.0))
  seq_len = min(128, int(c.model.max_position_embeddings))
  c.train.update(batch_size=32, seq_len=seq_len, learning_rate=2e-5, warmup_steps=0,
                 warmup_fraction=0.1, weight_decay=0.01, log_every=50, eval_every=0,
                 schedule="linear")
  apply_overrides(c, overrides)
  n_train, n_dev = len(task.splits["train"].labels), len(task.splits["dev"].labels)
  if "train.steps" not in dict(overrides):
    c.train.steps = max(1, int(round(epochs * n_train / c.train.batch_size)))
  # The trainer's eval loss covers the whole dev set (whole batches).
  if "train.eval_batches" not in dict(overrides):
    c.train.eval_batches = max(1, n_dev // c.train.batch_size)
  if "checkpoint.every" not in dict(overrides):
    c.checkpoint.every = max(1, min(500, c.train.steps))
  return c


def _predict(config, workdir: str, task):
  """(step, dev outputs) of a seed's last checkpoint: logits (N, C) or values (N,)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from amos_jax.data.glue import encode_split
  from amos_jax.data.tokenizer import load_tokenizer
  from amos_jax.hf.export import load_run
  from amos_jax.objectives import get_objective
  from amos_jax.objectives.base import SpecialTokens
  from amos_jax.train.state import abstract_model
  _, flat, step = load_run(workdir)
  tok = load_tokenizer(config.data.tokenizer)
  objective = get_objective(config, SpecialTokens.of(tok))
  graphdef, abstract = abstract_model(objective)
  filled = []
  for path, var in nnx.to_flat_state(abstract):
    if tuple(path) not in flat:
      raise CheckpointError(f"{workdir} step {step} lacks {'/'.join(map(str, path))}")
    filled.append((path, var.replace(jnp.asarray(flat[tuple(path)]))))
  params = nnx.from_flat_state(filled)

  @jax.jit
  def forward(params, batch):
    return objective.outputs(nnx.merge(graphdef, params), batch)

  rows = encode_split(tok, task.splits["dev"], int(config.train.seq_len))
  n = len(task.splits["dev"].labels)
  size = int(config.train.batch_size)
  outs = []
  for start in range(0, n, size):
    index = np.arange(start, start + size) % n   # the last batch wraps: one shape
    out = forward(params, {k: v[index] for k, v in rows.items()})
    outs.append(np.asarray(out)[:min(size, n - start)])
  return step, np.concatenate(outs)


def run(ref, task, *, seeds, out: str, overrides=(), pooling=None,
        epochs: float = 3.0) -> dict:
  """Fine-tunes and scores every seed; returns the results dict."""
  from amos_jax.config import freeze
  from amos_jax.eval import metrics as metrics_lib
  from amos_jax.train.loop import train_and_evaluate
  paths.makedirs(out)
  base = build_config(ref, task, out, list(overrides), pooling, epochs)
  labels = task.label_values("dev")
  rows = []
  for seed in seeds:
    c = ml_collections.ConfigDict(base.to_dict())
    c.train.seed = int(seed)
    config = freeze(c)
    workdir = paths.join(out, f"seed{seed}")
    train_and_evaluate(config, workdir)
    step, outputs = _predict(config, workdir, task)
    if step < config.train.steps:
      raise TrainingError(f"seed {seed} stopped at step {step} of {config.train.steps} "
                          f"({workdir}); run the same command again to resume")
    scores = metrics_lib.glue_scores(labels, outputs, task.regression, task.num_labels)
    rows.append(dict(seed=str(seed), step=int(step), **scores))
  names = [k for k in rows[0] if k not in ("seed", "step")]
  if len(rows) > 1:
    rows.append(dict(seed="median", step=rows[0]["step"],
                     **{k: float(np.median([r[k] for r in rows])) for k in names}))
  return dict(task="glue", data=task.directory, name=task.name,
              kind="regression" if task.regression else "classification",
              labels=task.label_names, text_columns=list(task.text_columns),
              label_column=task.label_column, dev_rows=int(len(labels)),
              train_rows=len(task.splits["train"].labels), seeds=list(seeds),
              config=dict(learning_rate=float(base.train.learning_rate),
                          batch_size=int(base.train.batch_size),
                          steps=int(base.train.steps), seq_len=int(base.train.seq_len),
                          pooling=base.objective.pooling),
              metrics=names, results=rows)


def add_parser(sub) -> None:
  """`amos-eval glue`'s arguments (sub: the amos-eval subparsers)."""
  g = sub.add_parser("glue", help="fine-tune a classification/regression head on a "
                     "GLUE-layout task; dev accuracy, F1, MCC or Pearson/Spearman")
  g.add_argument("--model", required=True, help="WORKDIR, WORKDIR@STEP or hf:PATH")
  g.add_argument("--task", required=True, help="folder with train.tsv and dev.tsv")
  g.add_argument("--seeds", default="1", help="comma-separated fine-tuning seeds; "
                 "several report each and the median")
  g.add_argument("--epochs", type=float, default=3.0, help="passes over train.tsv "
                 "(train.steps from it; --config.train.steps=N instead sets it)")
  g.add_argument("--pooling", choices=("cls", "mean"), default=None,
                 help="what the head reads (default: cls)")
  g.add_argument("--out", default=None, help="results and per-seed workdirs (default: "
                 "WORKDIR/eval/glue-TASK, or ./glue-TASK for hf:)")


def command(args) -> int:
  """Runs `amos-eval glue` from parsed arguments (args.overrides: --config pairs)."""
  from amos_jax.data.glue import load_task
  from amos_jax.eval.cli import _slug, markdown_table, write_results
  from amos_jax.eval.model import parse_model_ref
  seeds = parse_seeds(args.seeds)
  ref = parse_model_ref(args.model)
  overrides = list(getattr(args, "overrides", ()))
  given = dict(overrides)
  task = load_task(args.task, given.get("data.text_columns", ""),
                   given.get("data.label_column", ""))
  out = args.out or paths.join(ref.default_out, f"glue-{_slug(task.directory)}")
  if not paths.is_local(out):
    raise ConfigError(f"--out {out}: amos-eval glue writes a local folder; give a local "
                      "--out")
  out = os.path.abspath(out)
  if args.epochs <= 0:
    raise ConfigError(f"--epochs {args.epochs}: give a positive number of passes")
  results = run(ref, task, seeds=seeds, out=out, overrides=overrides,
                pooling=args.pooling, epochs=args.epochs)
  results["model"] = (f"hf:{ref.path}" if ref.kind == "hf" else
                      ref.path + (f"@{ref.step}" if ref.step is not None else ""))
  table = markdown_table(results["results"], ["seed", "step", *results["metrics"]])
  write_results(out, f"glue-{_slug(task.directory)}", results, table)
  return 0
