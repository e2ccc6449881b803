"""Built-in study suites, as data (the design and its rules: docs/study.md, study/rules.py).

Protocol: each optimizer's base LR is swept at the smallest batch, chosen on the validation split (never the
test split), the grid extended while the best value is at an edge and refined once at a near-tie; every
larger batch uses the paper's untuned rule (√ LR scaling, the same warmup steps, the same epoch budget, so
proportionally fewer steps); a tuned control sweeps each optimizer's own LR at the largest batch. A pilot
showed that the largest batch must still get ≥ ~300 optimizer steps, so the ladder starts small and the
epoch budget is chosen with it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Suite:
    name: str
    task: str
    batches: tuple[int, ...]                 # the ladder; batches[0] is the sweep batch
    epochs: float
    warmup_steps: int
    micro_batch_size: int
    lr_grids: dict[str, tuple[float, ...]]   # optimizer -> initial base-LR grid (at batches[0])
    task_options: dict[str, Any] = field(default_factory=dict)
    optimizer_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    seeds: int = 2                           # seeds per (optimizer, batch)
    seeds_largest: int = 3                   # seeds at the largest batch
    metric: str = "accuracy"                 # higher is better; test_<metric> is reported
    target: float | None = None              # validation metric for "steps to target"
    extend_grid: int = 2                     # max grid extensions when the best LR is at an edge
    # near-tie refinement (study/rules.py): when the two best LRs of a sweep are within ``near_tie``
    # (relative validation loss), one more LR on each side of the best, ``refine_factor`` away (0: off)
    near_tie: float = 0.02
    refine_factor: float = 3 ** 0.5
    # tuned control: each optimizer's own LR sweep at the largest batch (the same rules, the grid moved there
    # by the scaling rule), reported beside the untuned √-rule result
    tuned_control: bool = True
    seeds_max: int = 3                       # a cell gets seeds up to this when two seeds' spread overlaps
    # the smallest batch also trained this many times the epochs; finetune: the recipe this many times longer
    # for the random encoders and the smallest and largest pre-training batch (seeds 0 and 1)
    long_baseline: float | None = None
    baseline_seeds: int = 0                  # finetune: randomly initialised encoders fine-tuned as a baseline
    # optimizer label -> factory name (a preset), when the label is not itself the recipe
    optimizer_names: dict[str, str] = field(default_factory=dict)
    ablation: str | None = None              # a sibling suite with the same ladder, shown as an ablation row
    scaling: str = "sqrt"
    eval_points: int = 8                     # evaluations per run (for curves and steps-to-target)
    source: str | None = None                # finetune: the pre-training suite whose checkpoints are used
    # a two-phase ("mixed batch") run beside its single-phase twin: ``optimizer``, ``seeds``,
    # ``seq_len`` (the long length: the twin's, the last phase's and the evaluation's), ``twin_batch`` and
    # ``phases`` (dicts of seq_len, batch_size, epochs, warmup_steps, optional optimizer_state). Every LR
    # comes from the optimizer's swept base LR by the suite's scaling rule; the twin trains for the sum of
    # the phases' epochs (the same number of tokens) with the suite's warmup.
    two_phase: dict[str, Any] | None = None
    # the gradient noise scale checked against the ladder (docs/study.md, study/noise_check.py): after the sweep,
    # one probe per optimizer at batches[0] with its chosen LR, micro-batch batches[0]/2 and noise_scale on,
    # evaluated ``noise_probe`` times over its schedule (each evaluation closes a B_simple window) and stopped
    # one ladder evaluation after the batches[0] runs met the target (0: no probe)
    noise_probe: int = 0
    # the training-loss level whose steps the noise-scale section compares (a trailing mean, finer than the
    # evaluations); None: the validation target
    noise_loss_target: float | None = None
    description: str = ""


MLM_GRIDS = {"lamb": (1e-3, 3e-3, 1e-2), "adamw": (3e-4, 1e-3, 3e-3), "lars": (1e-3, 3e-3, 1e-2)}
MLM_MODEL = dict(vocab_size=4096, seq_len=32, hidden=64, layers=2, heads=2, intermediate=256, dropout=0.0)
IMAGE_GRIDS = {"lamb": (1e-3, 3e-3, 1e-2), "lars": (3e-3, 1e-2, 3e-2), "adamw": (3e-4, 1e-3, 3e-3),
               "sgd": (1e-2, 3e-2, 1e-1)}

SUITES: dict[str, Suite] = {s.name: s for s in [
    # measured on 2 cores (MALLOC tuned): 1,600 seq/s at batch 16, 2,800 at 1024 -> ~3 min a run, ~36 runs
    Suite("mlm-scaling", "mlm", batches=(16, 64, 256, 1024), epochs=10.0, warmup_steps=50,
          micro_batch_size=1024, lr_grids=MLM_GRIDS, task_options=MLM_MODEL,
          # steps-to-target threshold (report only): 0.10 was met at the first evaluation by every run below
          # batch 1024, which measures the evaluation spacing, not the optimizer; 0.13 separates them
          # noise_loss_target: reached by every ladder run of LAMB and AdamW but AdamW's at 1024 (lowest: 6.21),
          # docs/results/noise-scale/README.md; 80 probe evaluations: one B_simple window every 257 steps at 16
          target=0.13, noise_probe=80, noise_loss_target=5.95,
          two_phase=dict(optimizer="lamb", seeds=2, seq_len=64, twin_batch=512, phases=[
              dict(seq_len=32, batch_size=1024, epochs=9.0, warmup_steps=50),
              dict(seq_len=64, batch_size=512, epochs=1.0, warmup_steps=10, optimizer_state="reset_step")]),
          description="BERT MLM on Shakespeare (held out by play), batch 16 → 1024 (64×), LAMB vs AdamW vs LARS"),
    # 55,000 training images: 6 epochs = 323 steps at batch 1024. Measured on 2 cores: width 8 trains at
    # ~3,000-3,900 img/s (width 16: ~1,900) -> ~2 min a run.
    # The exclusions of the LARS/LAMB ResNet recipes (You et al. 2017; Goyal et al. 2017; the LAMB authors'
    # ResNet-50 code; MLPerf's LARS), docs/results/image-scaling/README.md: LAMB is the authors' ResNet
    # preset (no decay and no trust ratio for BatchNorm); LARS keeps BatchNorm and biases out of the trust ratio
    # and the decay (the lars_2017 groups with the ICLR 2020 update rule: mode, momentum, decay and trust
    # coefficient set back to the Lars defaults); AdamW and SGD keep them out of the decay (the factory's
    # default groups), SGD with the usual ResNet decay 5e-4.
    Suite("image-scaling", "image", batches=(16, 64, 256, 1024), epochs=6.0, warmup_steps=50,
          micro_batch_size=1024, lr_grids=IMAGE_GRIDS,
          optimizer_names={"lamb": "authors_resnet", "lars": "lars_2017"},
          optimizer_options={"lars": {"mode": "paper", "momentum": 0.9, "weight_decay": 0.01,
                                      "trust_coefficient": 0.001},
                             "sgd": {"weight_decay": 5e-4}},
          task_options=dict(width=8, blocks=1), target=0.85, eval_points=12, long_baseline=2.0,
          # (noise: training loss 0.5 reached by every ladder run of the first design; a window every 430 steps)
          ablation="image-scaling-no-exclusions", noise_probe=48, noise_loss_target=0.5,
          description="small ResNet on Fashion-MNIST, batch 16 → 1024 (64×), LAMB vs LARS vs AdamW vs SGD+momentum, "
                      "BatchNorm and biases excluded as in the LARS/LAMB ResNet recipes"),
    # the first image-scaling design, kept as the ablation row: LAMB's `paper` preset and LARS with a trust
    # ratio on every tensor (BatchNorm included), SGD without weight decay; the original protocol (no tuned
    # control, no refinement, no third seeds)
    Suite("image-scaling-no-exclusions", "image", batches=(16, 64, 256, 1024), epochs=6.0, warmup_steps=50,
          micro_batch_size=1024, lr_grids=IMAGE_GRIDS, task_options=dict(width=8, blocks=1), target=0.85,
          eval_points=12, refine_factor=0.0, tuned_control=False, seeds_max=0,
          description="image-scaling without the recipes' exclusions (LAMB `paper`, LARS ratio on every tensor, "
                      "SGD without decay): the ablation row"),
    Suite("finetune", "classify", batches=(32,), epochs=3.0, warmup_steps=10, micro_batch_size=32,
          lr_grids={"adamw": (1e-3,)}, seeds=1, seeds_largest=1, source="mlm-scaling", baseline_seeds=3,
          description="fine-tune every mlm-scaling checkpoint on BBC News: a downstream score per pre-training batch"),
    # pre-training on the downstream domain (docs/study.md): the same model, grids and ladder on the BBC News
    # articles' text (labels never read; the fine-tuning validation and test articles and their copies held
    # out). 28,126 training sequences (mlm-scaling: 32,851), so 11.68 epochs give the same optimizer steps
    # (20,532 at batch 16, 321 at 1024) and the same sequences. No steps-to-target threshold: none has been
    # measured on this corpus yet.
    Suite("mlm-news", "mlm", batches=(16, 64, 256, 1024), epochs=11.68, warmup_steps=50, micro_batch_size=1024,
          lr_grids=MLM_GRIDS, task_options={**MLM_MODEL, "corpus": "bbc-news"},
          description="BERT MLM on the BBC News articles' text (the fine-tuning test articles held out), batch 16 → "
                      "1024 (64×), LAMB vs AdamW vs LARS"),
    Suite("finetune-news", "classify", batches=(32,), epochs=3.0, warmup_steps=10, micro_batch_size=32,
          lr_grids={"adamw": (1e-3,)}, seeds=1, seeds_largest=1, source="mlm-news", baseline_seeds=3,
          long_baseline=5.0,  # 3 epochs leave the random encoder far from converged (0.48 vs 0.88 at 15)
          description="fine-tune every mlm-news checkpoint on BBC News (the finetune recipe): does in-domain "
                      "pre-training beat the random encoder?"),
    Suite("smoke", "mlm", batches=(16, 64), epochs=1.0, warmup_steps=2, micro_batch_size=64,
          lr_grids={"lamb": (3e-3, 1e-2), "adamw": (1e-3, 3e-3)},
          task_options=dict(vocab_size=512, seq_len=32, hidden=32, layers=1, heads=2, intermediate=64,
                            limit_train_sequences=256, max_eval_sequences=64),
          seeds=1, seeds_largest=2, target=0.05, extend_grid=1, eval_points=3, long_baseline=2.0,
          # (every smoke ladder run's training loss falls from 6.25 to 5.6–6.1 in its 4 or 16 steps)
          noise_probe=8, noise_loss_target=6.1,
          # (limit_train_sequences caps sequences, not tokens: here phase 1 sees half the tokens of the twin)
          two_phase=dict(optimizer="lamb", seeds=1, seq_len=32, twin_batch=32, phases=[
              dict(seq_len=16, batch_size=64, epochs=0.9, warmup_steps=2),
              dict(seq_len=32, batch_size=32, epochs=0.1, warmup_steps=1, optimizer_state="reset_step")]),
          description="the whole pipeline in about a minute (CI)"),
    # the in-domain pair in seconds (tests): one tiny pre-training run on the news text, then its fine-tuning
    Suite("smoke-news", "mlm", batches=(16,), epochs=1.0, warmup_steps=2, micro_batch_size=16,
          lr_grids={"lamb": (1e-2,)},
          task_options=dict(vocab_size=512, seq_len=32, hidden=32, layers=1, heads=2, intermediate=64,
                            corpus="bbc-news", limit_train_sequences=64, max_eval_sequences=64),
          seeds=1, seeds_largest=1, extend_grid=0, refine_factor=0.0, tuned_control=False, seeds_max=0,
          eval_points=2, description="mlm-news in seconds (CI)"),
    Suite("smoke-finetune-news", "classify", batches=(32,), epochs=1.0, warmup_steps=1, micro_batch_size=32,
          lr_grids={"adamw": (1e-3,)}, task_options=dict(seq_len=64, limit_train=64), seeds=1, seeds_largest=1,
          source="smoke-news", baseline_seeds=1, eval_points=1, long_baseline=2.0,
          description="finetune-news in seconds (CI)"),
]}


def get_suite(name: str) -> Suite:
    try:
        return SUITES[name]
    except KeyError:
        raise ValueError(f"Invalid suite: {name!r} (allowed: {' | '.join(SUITES)})") from None
