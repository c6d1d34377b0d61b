"""Small `amos-train` runs in subprocesses, for the trainer's tests."""
from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A 1-layer, 32-wide ELECTRA on 32-token rows: compiles in seconds on a CPU.
TINY_FLAGS = (
    "--config", os.path.join(ROOT, "configs", "electra.py") + ":tiny",
    "--config.model.num_layers=1", "--config.model.hidden_size=32",
    "--config.model.num_heads=2", "--config.model.intermediate_size=64",
    "--config.model.embedding_size=32", "--config.model.vocab_size=128",
    "--config.model.max_position_embeddings=32", "--config.model.hidden_dropout=0.1",
    "--config.model.attention_dropout=0.0", "--config.train.seq_len=32",
    "--config.train.batch_size=8", "--config.train.warmup_steps=1",
    "--config.train.learning_rate=1e-3", "--config.train.log_every=1",
    "--config.train.eval_every=0", "--config.data.eval_fraction=0",
    "--config.checkpoint.async_save=True",
    # No persistent compilation cache: in-process runs would leave it set for the
    # worker's later tests (tests/test_compile_cache.py tests it on its own).
    "--config.train.compilation_cache_dir=",
)


def env_for(devices: int = 1) -> dict:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                              "SLURM_", "OMPI_"))}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             TF_CPP_MIN_LOG_LEVEL="2")
  return env


def env_for_host(cpu_devices: str | None = None) -> dict:
  """env_for without a device count given to JAX, so that amos_jax/hostcpu.py sizes
  the CPU client: from AMOS_JAX_CPU_DEVICES=cpu_devices, or `auto` where None."""
  env = env_for()
  for key in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", "AMOS_JAX_CPU_DEVICES"):
    env.pop(key, None)
  if cpu_devices is not None:
    env["AMOS_JAX_CPU_DEVICES"] = cpu_devices
  return env


@pytest.fixture(scope="session")
def corpus_and_tokenizer(tmp_path_factory):
  """A synthetic text corpus and a 128-piece sentencepiece model trained on it."""
  from amos_jax.data.tokenizer import train_sentencepiece
  d = tmp_path_factory.mktemp("corpus")
  rnd = random.Random(0)
  words = ["".join(rnd.choice("abcdefghij") for _ in range(rnd.randint(2, 6)))
           for _ in range(300)]
  docs = [" ".join(rnd.choice(words) for _ in range(rnd.randint(20, 60)))
          for _ in range(400)]
  path = d / "corpus.txt"
  path.write_text("\n".join(docs) + "\n")
  tok = train_sentencepiece(docs, vocab_size=128, model_type="unigram")
  tok.save(str(d / "tokenizer"))
  return str(path), str(d / "tokenizer")


def train_cmd(workdir, corpus_and_tok, *extra) -> list[str]:
  corpus, tok = corpus_and_tok
  return [sys.executable, "-m", "amos_jax.cli", *TINY_FLAGS, "--workdir", str(workdir),
          f"--config.data.corpus={corpus}", f"--config.data.tokenizer={tok}", *extra]


def run_train(workdir, corpus_and_tok, *extra, devices=1, timeout=300):
  return subprocess.run(train_cmd(workdir, corpus_and_tok, *extra), env=env_for(devices),
                        capture_output=True, text=True, timeout=timeout, cwd=ROOT)
