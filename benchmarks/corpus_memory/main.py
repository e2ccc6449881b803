"""Peak memory while the mlm task reads, splits and tokenises an own corpus, for corpora of growing size.

    python benchmarks/corpus_memory/main.py --sizes-mb 25 100 --out benchmarks/corpus_memory/results

For each size a plain-text corpus is generated (Zipf-distributed words from a 20,000-word vocabulary,
lines of 8-24 words, documents of 5-40 lines separated by blank lines), then a fresh process builds
``build_task("mlm", data=[file], ...)`` with an empty cache: count documents, train WordPiece on the
training documents (streamed), tokenise into the memory-mapped cache, open the windows. Reported per size:
the process's peak RSS (``ru_maxrss``), its RSS right after the imports, its anonymous and file-backed RSS
at the end (pages of the memory-mapped token files count as file-backed RSS once read: clean page cache
the kernel can drop), the wall time and the cache size.
If reading were not streamed, the peak would grow with the corpus; here it should not.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, os, resource, sys, time
import torch, transformers, tokenizers
from largebatch.tasks import build_task
def rss_mb(field="VmRSS"):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":")) / 1024
after_imports = rss_mb()
t0 = time.perf_counter()
task = build_task("mlm", data=[sys.argv[1]], vocab_size=8192, seq_len=128, hidden=64, layers=1, heads=1,
                  intermediate=128)
elapsed = time.perf_counter() - t0
cache = task.corpus.cache
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_after_imports_mb": after_imports, "seconds": elapsed,
                  "rss_anon_mb_at_end": rss_mb("RssAnon"), "rss_file_mb_at_end": rss_mb("RssFile"),
                  "train_tokens": task.corpus.meta["tokens"]["train"],
                  "documents": sum(task.corpus.meta["documents"].values()),
                  "cache_mb": sum(f.stat().st_size for f in cache.iterdir()) / 2**20,
                  "train_sequences": task.train_size}))
"""


def generate(path: Path, size_mb: float, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    vocab = np.array(["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 10)))
                      for _ in range(20_000)])
    target = int(size_mb * 2**20)
    with path.open("w") as f:
        written = 0
        while written < target:
            lines = []
            for _ in range(rng.integers(5, 41)):
                words = vocab[np.minimum(rng.zipf(1.2, rng.integers(8, 25)) - 1, len(vocab) - 1)]
                lines.append(" ".join(words))
            block = "\n".join(lines) + "\n\n"
            f.write(block)
            written += len(block)


def measure(size_mb: float, workdir: Path, threads: int) -> dict:
    corpus = workdir / f"corpus-{size_mb:g}mb.txt"
    generate(corpus, size_mb)
    env = {**os.environ, "LARGEBATCH_CACHE": str(workdir / f"cache-{size_mb:g}"), "OMP_NUM_THREADS": str(threads),
           "RAYON_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "true"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(corpus)], env=env, capture_output=True, text=True,
                         check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"corpus_mb": corpus.stat().st_size / 2**20, **result}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes-mb", type=float, nargs="+", default=[25, 100])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/corpus_memory/results"))
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes_mb:
            rows.append(measure(size, Path(tmp), args.threads))
            print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d")
    report = {"date": stamp, "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared, noisy)",
              "threads": args.threads, "rows": rows}
    (args.out / f"{stamp}.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
