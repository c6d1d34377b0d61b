"""Loader throughput (tokens/s per host) beside the train step's consumption.

  .venv/bin/python benchmarks/bench_loader.py                 # loader + step timings
  .venv/bin/python benchmarks/bench_loader.py --no-step       # loader only
  .venv/bin/python benchmarks/bench_loader.py --data DIR      # shards you prepared

Prepares the embedded demo corpus (sentencepiece BPE, 8k) into a temporary
directory unless --data is given, then times the grain pipeline at seq_len 512:
packed and unpacked, with and without the background prefetch thread, on the full
corpus (long Wikipedia articles) and on its short news items alone. "tokens/s"
counts every position of a batch (what the step consumes); "real" excludes padding.
The step timings build the real train step (configs/demo.py and configs/amos.py:base)
and run it on loader batches; a step that fails to build is reported, not fatal.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from amos_jax.data import corpus  # noqa: E402
from amos_jax.data import pipeline as pl  # noqa: E402
from amos_jax.data import prepare, records  # noqa: E402


def prepare_demo(root, news_only=False):
  out = os.path.join(root, "news" if news_only else "demo")
  tok = os.path.join(root, "demo", "tokenizer")
  if news_only:
    src = os.path.join(root, "news.txt")
    with open(src, "w") as f:
      f.write("\n".join(corpus.news_documents()) + "\n")
    prepare.prepare([src], out, tokenizer=tok, progress=False)
  else:
    prepare.prepare(["demo"], out, train_tokenizer=True, vocab_size=8000,
                    model_type="bpe", progress=False)
  return out


def time_loader(data_dir, seconds, **kw):
  cfg = pl.PipelineConfig(data_dir, process_index=0, process_count=1, **kw)
  it = pl.make_iterator(cfg)
  next(it)  # first batch: opening shards, warming the prefetch thread
  n = real = batches = 0
  start = time.perf_counter()
  while time.perf_counter() - start < seconds:
    b = next(it)
    n += b["input_ids"].size
    real += int((b["segment_ids"] > 0).sum())
    batches += 1
  dt = time.perf_counter() - start
  return n / dt, real / dt, batches / dt


def time_step(config_spec, batch_size, seq_len, data_dir, steps):
  """Train-step tokens/s of a config on batches from the loader."""
  import jax
  from amos_jax.config import load_config_file
  from amos_jax.objectives import get_objective
  from amos_jax.train import sharding as shd
  from amos_jax.train.step import build_trainer

  config = load_config_file(config_spec)
  with config.unlocked():
    config.train.batch_size, config.train.seq_len = batch_size, seq_len
    config.model.vocab_size = 8000
    config.model.max_position_embeddings = max(config.model.max_position_embeddings,
                                               seq_len)
  trainer_mesh = shd.build_mesh(config.mesh)
  trainer = build_trainer(get_objective(config), trainer_mesh)
  state, batch_sh, step = trainer.state, trainer.batch_sharding, trainer.train_step
  it = pl.make_iterator(pl.PipelineConfig(data_dir, seq_len=seq_len,
                                          global_batch_size=batch_size))
  batch = pl.to_global_arrays(next(it), trainer_mesh, batch_sh)
  state, m = step(state, batch)  # compile
  jax.block_until_ready(m)
  start = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, pl.to_global_arrays(next(it), trainer_mesh, batch_sh))
  jax.block_until_ready(m)
  dt = (time.perf_counter() - start) / steps
  return batch_size * seq_len / dt, dt


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data", help="a prepared directory (default: prepare the demo corpus)")
  p.add_argument("--seconds", type=float, default=5.0, help="per loader measurement")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--no-step", action="store_true", help="skip the train-step timings")
  args = p.parse_args()

  with tempfile.TemporaryDirectory() as root:
    datasets = {"given": args.data} if args.data else {
        "demo corpus": prepare_demo(root), "news only": prepare_demo(root, news_only=True)}
    print(f"loader, seq_len 512, batch {args.batch_size}, 1 process "
          f"({os.cpu_count()} CPUs)")
    print(f"{'data':<12} {'packing':<8} {'prefetch':<9} {'tokens/s':>12} {'real/s':>12} "
          f"{'batches/s':>10}")
    for name, d in datasets.items():
      m = records.load_manifest(d)
      for packing in (True, False):
        for prefetch in (0, 2):
          tok, real, bps = time_loader(d, args.seconds, seq_len=512, packing=packing,
                                       prefetch=prefetch,
                                       global_batch_size=args.batch_size)
          print(f"{name:<12} {str(packing):<8} {prefetch:<9} {tok:>12,.0f} "
                f"{real:>12,.0f} {bps:>10.1f}", flush=True)
      print(f"  ({m['num_documents']} documents, {m['num_tokens']:,} tokens, "
            f"mean {m['num_tokens'] / m['num_documents']:.0f} tokens/document)")
    if args.no_step:
      return
    data = next(iter(datasets.values()))
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    print("\ntrain step consumption (this machine)")
    for label, spec, b, t, steps in (
        ("demo (configs/demo.py), batch 32 x 128", "configs/demo.py", 32, 128, 5),
        ("base (configs/amos.py:base), batch 8 x 512", "configs/amos.py:base", 8, 512, 2)):
      try:
        tps, dt = time_step(os.path.join(here, spec), b, t, data, steps)
        print(f"  {label}: {tps:,.0f} tokens/s ({dt * 1e3:.0f} ms/step)", flush=True)
      except Exception as e:  # the step is another module's; report, go on
        print(f"  {label}: not measured ({type(e).__name__}: {e})", flush=True)


if __name__ == "__main__":
  main()
