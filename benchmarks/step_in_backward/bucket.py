"""Step in backward, one tensor per ``step_params`` call vs buckets (docs/step_in_backward.md "Time").

BERT-base MLM (transformers ``BertForMaskedLM(BertConfig())``), batch 8, sequence 128, fp32, one thread.
Three copies of the same initial model, side by side in one process: the ordinary Lamb step
(``backward(); step(); zero_grad()``), ``step_in_backward(bucket_bytes=0)`` and the default bucket. After one
warm-up step each, whole training steps (forward, backward, step) are timed in rounds, the order of each
round shuffled with a fixed seed so the variants share the machine's noise. Prints the median step of each
and the ratios. Run: ``PYTHONPATH=src python benchmarks/step_in_backward/bucket.py [rounds]``.
"""
from __future__ import annotations

import copy
import random
import statistics
import sys
import time

import torch
from transformers import BertConfig, BertForMaskedLM

import largebatch


def _count_calls(opt) -> list[int]:
    """Count ``opt.step_params`` calls (a few Python operations per call; the ordinary step makes none)."""
    count, real = [0], opt.step_params

    def counted(params):
        count[0] += 1
        real(params)

    opt.step_params = counted
    return count


def main(rounds: int = 5) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = BertForMaskedLM(BertConfig())
    ids = torch.randint(0, base.config.vocab_size, (8, 128))
    variants, calls = {}, {}
    for name, bucket in (("ordinary", None), ("per-tensor", 0), ("bucketed", largebatch.optim.backward.DEFAULT_BUCKET_BYTES)):
        model = copy.deepcopy(base)
        opt = largebatch.Lamb(largebatch.param_groups(model, weight_decay=0.01), lr=1e-4, nonfinite="raise")
        handle = None if bucket is None else largebatch.step_in_backward(model, opt, bucket_bytes=bucket)
        variants[name] = (model, opt, handle)
        calls[name] = _count_calls(opt)
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    rng = random.Random(0)
    for r in range(rounds + 1):
        rng.shuffle(order)
        for name in order:
            model, opt, handle = variants[name]
            t0 = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            if handle is None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            if r:  # round 0 warms up
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, m in med.items():
        print(f"{name:10s} median {m * 1e3:8.1f} ms  steps {[round(t * 1e3) for t in times[name]]}  "
              f"step_params calls a step {calls[name][0] / (rounds + 1):g}")
    print(f"per-tensor / ordinary {med['per-tensor'] / med['ordinary']:.3f}  bucketed / ordinary "
          f"{med['bucketed'] / med['ordinary']:.3f}  bucketed / per-tensor {med['bucketed'] / med['per-tensor']:.3f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
