"""Run a suite: LR sweep at the smallest batch, then the batch ladder with the untuned √ rule.

Resumable: every run lives in ``<out>/runs/<name>``; a finished run (``summary.json``) is never redone, an
interrupted one continues from its last checkpoint. One overall progress bar with an ETA.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from .. import schedules
from . import rules
from .analysis import RANDOM_ENCODER
from .noise_check import PROBE_KIND, loss_steps, probe_name
from .runs import BASELINES_FILE, load_baselines, read_config, steps_to_target
from .stats import same_lr
from .suites import Suite, get_suite


def run_name(optimizer: str, batch: int, lr: float, seed: int) -> str:
    return f"{optimizer}-b{batch}-lr{lr:.3g}-s{seed}"


def middle_out(n: int) -> list[int]:
    """Indices 0..n-1 from the middle outwards: 3 -> [1, 0, 2], 4 -> [2, 1, 3, 0]."""
    mid = n // 2
    out = [mid]
    for k in range(1, n):
        for j in (mid - k, mid + k):
            if 0 <= j < n:
                out.append(j)
    return out


class SuiteRunner:
    def __init__(self, suite: Suite, out: str | Path, *, threads: int | None = None, progress: bool = True,
                 verbose: bool = False, baselines_only: bool = False):
        self.suite, self.out = suite, Path(out)
        self.threads, self.progress, self.verbose = threads, progress, verbose
        self.baselines_only = baselines_only  # only the baselines, no training run (nor study.json) touched
        self.runs_dir = self.out / "runs"
        self._tasks: dict[str, Any] = {}
        self.bar = None

    # ------------------------------------------------------------------ one run
    def _task(self, options: dict):
        """A task per (options, seed), built once; each run starts from the seed's pristine weights."""
        import copy

        from ..tasks import build_task

        key = json.dumps(options, sort_keys=True)
        if key not in self._tasks:
            task = build_task(self.suite.task, **options)  # the model is initialised from options["seed"]
            self._tasks[key] = (task, copy.deepcopy(task.model.state_dict()))
        task, pristine = self._tasks[key]
        task.model.load_state_dict(pristine)
        return task

    def two_phase(self, base_lr: float) -> list[dict]:
        """The suite's two-phase run and its single-phase twin (same tokens, same model), per seed."""
        s, tp = self.suite, self.suite.two_phase
        opt, b0 = tp["optimizer"], s.batches[0]
        longest = max([tp["seq_len"]] + [p["seq_len"] for p in tp["phases"]])
        options = {"seq_len": tp["seq_len"], "max_position": longest}
        phases = [{"batch_size": p["batch_size"], "lr": schedules.scale_lr(base_lr, b0, p["batch_size"], s.scaling),
                   "warmup_steps": p["warmup_steps"], "epochs": p["epochs"], "seq_len": p["seq_len"],
                   "micro_batch_size": min(p["batch_size"], s.micro_batch_size),
                   **({"optimizer_state": p["optimizer_state"]} if "optimizer_state" in p else {})}
                  for p in tp["phases"]]
        epochs = sum(p["epochs"] for p in tp["phases"])
        twin_lr = schedules.scale_lr(base_lr, b0, tp["twin_batch"], s.scaling)
        out = []
        for seed in range(tp["seeds"]):
            out.append(self.run_one(opt, tp["twin_batch"], twin_lr, seed, extra_task_options=options, epochs=epochs,
                                    name=f"twin-{opt}-b{tp['twin_batch']}-len{tp['seq_len']}-s{seed}",
                                    tags={"kind": "two-phase-twin", "seq_len": tp["seq_len"]}))
            label = "-".join(f"b{p['batch_size']}x{p['seq_len']}" for p in phases)
            out.append(self.run_one(opt, phases[-1]["batch_size"], phases[-1]["lr"], seed, extra_task_options=options,
                                    phases=phases, name=f"two-phase-{opt}-{label}-s{seed}",
                                    tags={"kind": "two-phase", "seq_len": tp["seq_len"], "phases": phases}))
        return out

    def run_one(self, optimizer: str, batch: int, lr: float, seed: int, *, extra_task_options: dict | None = None,
                name: str | None = None, tags: dict | None = None, phases: list[dict] | None = None,
                epochs: float | None = None, eval_points: int | None = None, overrides: dict | None = None) -> dict:
        """Train one configuration (or read its finished summary). ``eval_points``: evaluations over the
        schedule (default: the suite's); ``overrides``: TrainConfig fields set on top (the noise probe's)."""
        from ..checkpoint import list_checkpoints
        from ..train.config import DATA_FIELDS
        from ..train.loop import TrainConfig, train

        s = self.suite
        run_dir = self.runs_dir / (name or run_name(optimizer, batch, lr, seed))
        done = run_dir / "summary.json"
        done_before = done.exists()
        if done_before:
            summary = json.loads(done.read_text())
        else:
            task_options = {**s.task_options, **(extra_task_options or {}), "seed": seed}
            task = self._task(task_options)
            epochs = s.epochs if epochs is None else epochs
            total = schedules.steps_for_epochs(epochs, task.train_size, batch)
            cfg = TrainConfig(
                task=s.task, task_options={k: v for k, v in task_options.items() if k != "seed" and k not in DATA_FIELDS},
                **{k: v for k, v in task_options.items() if k in DATA_FIELDS},  # the user's data: config fields
                optimizer=s.optimizer_names.get(optimizer, optimizer),
                optimizer_options=dict(s.optimizer_options.get(optimizer, {})),
                batch_size=batch, micro_batch_size=min(batch, s.micro_batch_size), lr=lr,
                warmup_steps=min(s.warmup_steps, total), epochs=epochs, seed=seed, phases=phases,
                eval_every=max(1, math.ceil(total / (eval_points or s.eval_points))),
                checkpoint_every=max(1, math.ceil(total / 4)), trust_every=max(1, math.ceil(total / 40)),
                keep_checkpoints=1, out=str(run_dir), threads=self.threads, progress=self.verbose, plot=False)
            cfg = dataclasses.replace(cfg, **(overrides or {}))
            if phases:  # the cadence of evaluations and checkpoints follows the phases' total
                from ..train.loop import plan_phases
                plan = plan_phases(cfg, task)
                total = plan[-1].start + plan[-1].phase.steps
                cfg = dataclasses.replace(cfg, eval_every=max(1, math.ceil(total / s.eval_points)),
                                          checkpoint_every=max(1, math.ceil(total / 4)),
                                          trust_every=max(1, math.ceil(total / 40)))
            resume = str(run_dir) if list_checkpoints(run_dir) else None
            import contextlib
            import io
            sink = contextlib.nullcontext() if self.verbose else contextlib.redirect_stdout(io.StringIO())
            with sink:
                summary = train(cfg, resume=resume, task=task)
        if not done_before or (tags or {}).get("kind") == "ladder" or "kind" not in summary:
            # a finished run read back by another stage keeps its kind; the ladder claims the runs it shares
            # (the chosen sweep run, the √-rule run of the tuned grid)
            summary.update(tags or {})
        summary.update({"optimizer": optimizer, "batch_size": batch, "lr": lr, "seed": seed, "run": run_dir.name})
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if self.bar is not None:
            if done_before:  # counted, but kept out of the rate: the ETA is that of runs actually trained
                self.bar.n += 1
                self.bar.last_print_n += 1
                self.bar.refresh()
            else:
                self.bar.update(1)
            self.bar.set_postfix(run=run_dir.name)
        return summary

    # ------------------------------------------------------------------ the protocol
    def _grow(self, n: int) -> None:
        """The plan grew by ``n`` runs (a grid extension, a refinement, a third seed)."""
        if self.bar is not None and n:
            self.bar.total += n
            self.bar.refresh()

    def sweep(self, optimizer: str, batch: int | None = None, grid: tuple[float, ...] | None = None,
              kind: str = "sweep") -> tuple[float, list[dict]]:
        """The best LR at ``batch`` (default: the smallest) by validation loss, seed 0: the grid, extended while
        the best is at an edge, then refined once around the best when the two best are a near-tie."""
        s = self.suite
        batch = s.batches[0] if batch is None else batch
        pending = sorted(s.lr_grids[optimizer] if grid is None else grid)
        results: dict[float, dict] = {}

        def run(lrs):
            for lr in lrs:
                if lr not in results:
                    results[lr] = self.run_one(optimizer, batch, lr, 0, tags={"kind": kind})
            return {lr: rules.sweep_score(r) for lr, r in results.items()}

        scores = run(pending)
        for _ in range(s.extend_grid):
            new = rules.extension(scores)
            if new is None:
                break  # inside the grid (with no extension left the report calls the choice provisional)
            self._grow(1)
            scores = run([new])
        finer = rules.refinement(scores, s.near_tie, s.refine_factor) if s.refine_factor else []
        self._grow(len(finer))
        scores = run(finer)
        return rules.best_lr(scores), list(results.values())

    def prime(self, batch: int, grids: dict[str, tuple[float, ...]], kind: str) -> None:
        """Train the initial grids of all optimizers interleaved, middle LR first, so that a partial study
        already compares every optimizer; the sweeps then read these runs back (and count them again)."""
        for i in middle_out(max(len(g) for g in grids.values())):
            for optimizer, grid in grids.items():
                if i < len(grid):
                    self.run_one(optimizer, batch, sorted(grid)[i], 0, tags={"kind": kind})

    def tuned_grid(self, optimizer: str) -> tuple[float, ...]:
        """The tuned control's initial grid at the largest batch: the sweep grid moved by the scaling rule, so
        the √-rule LR of an in-grid choice is one of its points."""
        s = self.suite
        return tuple(schedules.scale_lr(lr, s.batches[0], s.batches[-1], s.scaling) for lr in s.lr_grids[optimizer])

    def seeds_at(self, batch: int) -> int:
        return self.suite.seeds_largest if batch == self.suite.batches[-1] else self.suite.seeds

    def plan_size(self) -> int:
        """Runs planned before any result is known; extensions, refinements and third seeds add to it."""
        s = self.suite
        n_opt = len(s.lr_grids)
        sweep = 2 * sum(len(g) for g in s.lr_grids.values())  # primed, then read back by the sweep
        ladder = sum(self.seeds_at(b) for b in s.batches) * n_opt
        tuned = (sweep + s.seeds_largest * n_opt) if s.tuned_control and len(s.batches) > 1 else 0
        long = n_opt if s.long_baseline else 0
        two_phase = 2 * s.two_phase["seeds"] if s.two_phase else 0
        probes = n_opt if s.noise_probe else 0
        # a run shared by two stages (the chosen sweep run, the √-rule run inside the tuned grid) is read back
        # and counted again
        return sweep + ladder + tuned + long + two_phase + probes

    def ladder(self, optimizer: str, base_lr: float, batches: tuple[int, ...]) -> None:
        s = self.suite
        for batch in batches:
            lr = schedules.scale_lr(base_lr, s.batches[0], batch, s.scaling)
            for seed in range(self.seeds_at(batch)):
                self.run_one(optimizer, batch, lr, seed, tags={"kind": "ladder"})

    def tuned_seeds(self, optimizer: str, lr: float, seeds: int) -> list[dict]:
        b1 = self.suite.batches[-1]
        return [self.run_one(optimizer, b1, lr, seed, tags={"kind": "tuned"}) for seed in range(seeds)]

    def more_seeds(self, chosen: dict[str, float], tuned: dict[str, float]) -> None:
        """A third seed (up to ``seeds_max``) where two seeds' spread overlaps a difference the report judges."""
        s = self.suite
        cells: dict[tuple[str, int], list] = {}
        lrs: dict[tuple[str, int], float] = {}
        for opt, base in chosen.items():
            for b in s.batches:
                lrs[(opt, b)] = schedules.scale_lr(base, s.batches[0], b, s.scaling)
            if opt in tuned:
                lrs[(f"{opt}:tuned", s.batches[-1])] = tuned[opt]
        for (label, b), lr in lrs.items():
            opt = label.split(":")[0]
            n = self.seeds_at(b) if ":" not in label else s.seeds_largest
            cells[(label, b)] = [self._finished(opt, b, lr, seed).get(f"test_{s.metric}") for seed in range(n)]
        pairs = rules.judged_pairs(list(chosen), s.batches)
        pairs += [((o, s.batches[-1]), (f"{o}:tuned", s.batches[-1])) for o in tuned
                  if not same_lr(tuned[o], lrs[(o, s.batches[-1])])]
        todo = sorted(rules.cells_needing_seeds(cells, pairs, s.seeds_max))
        self._grow(sum(s.seeds_max - len(cells[c]) for c in todo))
        for label, b in todo:
            opt = label.split(":")[0]
            kind = "tuned" if ":" in label else "ladder"
            for seed in range(len(cells[(label, b)]), s.seeds_max):
                self.run_one(opt, b, lrs[(label, b)], seed, tags={"kind": kind})

    def probe_stop(self, optimizer: str, base_lr: float) -> int | None:
        """The noise probe's last step: one ladder evaluation after the last of the smallest batch's ladder runs
        met the target (the validation target and, when the suite sets one, the training-loss target); None (the
        whole schedule) when a run has not met it."""
        s = self.suite
        b0 = s.batches[0]
        dirs = [str(d) for seed in range(max(self.seeds_at(b0), s.seeds_max))
                if ((d := self.runs_dir / run_name(optimizer, b0, base_lr, seed)) / "summary.json").exists()]
        met = [steps_to_target(d, f"validation_{s.metric}", s.target)[0] for d in dirs] if s.target is not None else []
        if s.noise_loss_target is not None:
            met += loss_steps({b0: dirs}, s.noise_loss_target)[b0]
        if not met or None in met:
            return None
        return max(met) + (read_config(dirs[0]).get("eval_every") or 0)

    def noise_probe(self, optimizer: str, base_lr: float) -> dict:
        """The gradient noise scale at the smallest batch with the chosen LR: micro-batch b0/2 (two batch sizes),
        ``noise_probe`` evaluations over the schedule, stopped after :meth:`probe_stop` (same LR schedule)."""
        s = self.suite
        b0 = s.batches[0]
        stop = self.probe_stop(optimizer, base_lr)
        return self.run_one(optimizer, b0, base_lr, 0, name=probe_name(optimizer, b0, base_lr),
                            eval_points=s.noise_probe, tags={"kind": PROBE_KIND},
                            overrides={"micro_batch_size": max(1, b0 // 2), "noise_scale": True,
                                       "stop_after_steps": stop})

    def _finished(self, optimizer: str, batch: int, lr: float, seed: int) -> dict:
        f = self.runs_dir / run_name(optimizer, batch, lr, seed) / "summary.json"
        return json.loads(f.read_text()) if f.exists() else {}

    def long_baseline(self, optimizer: str, base_lr: float) -> dict:
        """The smallest batch trained ``long_baseline``× the epochs: how far the ladder is from converged."""
        s = self.suite
        epochs = s.epochs * s.long_baseline
        return self.run_one(optimizer, s.batches[0], base_lr, 0, epochs=epochs,
                            name=f"long-{run_name(optimizer, s.batches[0], base_lr, 0)}-e{epochs:g}",
                            tags={"kind": "long-baseline", "epochs": epochs})

    def task_baselines(self) -> dict:
        """The task's calibration baselines that are not training runs, computed once into baselines.json:
        for ``mlm`` the bigram baseline on the ladder's evaluation masks (study/baselines.py)."""
        found = load_baselines(self.out)
        if self.suite.task != "mlm" or "bigram" in found:
            return found
        from .baselines import mlm_task_bigram

        options = {**self.suite.task_options, "seed": 0}
        found["bigram"] = {**mlm_task_bigram(self._task(options)), "task_options": options}
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / BASELINES_FILE).write_text(json.dumps(found, indent=2))
        return found

    def run(self) -> dict:
        """Most decisive first: the tuned control at the largest batch (sweep, then seeds), the base-LR sweep at
        the smallest batch, the largest batch with the √ rule, then the rest of the ladder, third seeds, the
        noise-scale probes, the long baseline and the two-phase run."""
        s = self.suite
        self.out.mkdir(parents=True, exist_ok=True)
        baselines = self.task_baselines()  # seconds
        if self.baselines_only:
            return {"suite": s.name, "baselines": sorted(baselines)}
        if self.progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=self.plan_size(), desc=f"study {s.name}", unit="run", dynamic_ncols=True)
        control = s.tuned_control and len(s.batches) > 1
        if control:
            self.prime(s.batches[-1], {o: self.tuned_grid(o) for o in s.lr_grids}, "tuned-sweep")
        tuned = {o: self.sweep(o, s.batches[-1], self.tuned_grid(o), kind="tuned-sweep")[0]
                 for o in s.lr_grids} if control else {}
        self._save(tuned=tuned)
        for o, lr in tuned.items():  # cheap (the largest batch): each optimizer's best at that batch, seeded
            self.tuned_seeds(o, lr, s.seeds_largest)
        self.prime(s.batches[0], s.lr_grids, "sweep")
        chosen = {o: self.sweep(o)[0] for o in s.lr_grids}
        self._save(chosen, tuned)
        for o, base in chosen.items():
            self.ladder(o, base, s.batches[-1:])
        for o, base in chosen.items():
            self.ladder(o, base, s.batches[:-1])
        self.more_seeds(chosen, tuned)
        if s.noise_probe:  # after the smallest batch's ladder runs: they say where the probe may stop
            for o, base in chosen.items():
                self.noise_probe(o, base)
        if s.long_baseline:
            for o, base in chosen.items():
                self.long_baseline(o, base)
        if s.two_phase:
            self.two_phase(chosen[s.two_phase["optimizer"]])
        if self.bar is not None:
            self.bar.close()
        return self._save(chosen, tuned, done=True)

    def _save(self, chosen: dict | None = None, tuned: dict | None = None, done: bool = False) -> dict:
        """study.json: the chosen base LRs (absent until the sweep is over), the tuned control's LRs."""
        state: dict[str, Any] = {"suite": self.suite.name}
        if chosen is not None:
            state["base_lr"] = chosen
        if tuned:
            state["tuned_lr"] = {"batch": self.suite.batches[-1], **tuned}
        if not done:
            state["running"] = True
        (self.out / "study.json").write_text(json.dumps(state, indent=2))
        return state


class FinetuneRunner(SuiteRunner):
    """Fine-tune every ladder run of the source suite (``<out>/../<source>``) with one fixed recipe, and the
    baselines that calibrate it (study/baselines.py): a randomly initialised encoder with the same recipe and a
    TF-IDF + logistic-regression classifier. ``baselines_only``: the baselines alone (no pre-trained runs needed)."""

    def sources(self) -> list[Path]:
        """The source suite's finished ladder runs; checked before any work: a study copied without its
        checkpoints (they are not committed) fails here with the fix."""
        from ..checkpoint import list_checkpoints

        s = self.suite
        source = self.out.parent / s.source / "runs"
        sources = sorted(p for p in source.glob("*") if (p / "summary.json").exists()
                         and json.loads((p / "summary.json").read_text()).get("kind") == "ladder")
        if not sources:
            raise FileNotFoundError(f"no finished {s.source} runs under {source}: run `largebatch study {s.source}` first")
        missing = [p.name for p in sources if not list_checkpoints(p)]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(sources)} {s.source} runs have no checkpoint (ckpt-*.pt) to fine-tune from: "
                f"{', '.join(missing)}. Retrain them on this machine: move those folders out of {source} and rerun "
                f"`largebatch study {s.source} --out {self.out.parent / s.source}` (it trains only the runs it lacks), "
                f"or run only the baselines with --baselines-only")
        return sources

    def finetune(self, checkpoint: Path, name: str, tags: dict) -> dict:
        optimizer, (lr,) = next(iter(self.suite.lr_grids.items()))
        self._tasks.clear()  # the encoder differs per source run
        return self.run_one(optimizer, self.suite.batches[0], lr, 0, extra_task_options={"checkpoint": str(checkpoint)},
                            name=name, tags=tags)

    def baselines(self) -> None:
        """The random-initialisation encoders (one per seed) fine-tuned with the recipe, then TF-IDF."""
        from .baselines import random_encoder, tfidf_logreg

        s = self.suite
        pre = get_suite(s.source)
        encoders = []
        for seed in range(s.baseline_seeds):
            enc = random_encoder(pre.task, pre.task_options, seed, self.runs_dir / f"random-encoder-s{seed}")
            encoders.append(enc)
            self.finetune(enc, f"ft-random-encoder-s{seed}", {"kind": "finetune-baseline", "baseline": RANDOM_ENCODER,
                                                              "pretrain_seed": seed})
        done = self.runs_dir / "tfidf-logreg" / "summary.json"
        if encoders and not done.exists():  # the last fine-tuned task: the same splits and tokens as every run
            task = self._task({**s.task_options, "checkpoint": str(encoders[-1]), "seed": 0})
            done.parent.mkdir(parents=True, exist_ok=True)
            done.write_text(json.dumps({"kind": "finetune-baseline", "baseline": "TF-IDF + logistic regression",
                                        "run": "tfidf-logreg", **tfidf_logreg(task.data)}, indent=2))

    def run(self) -> dict:
        s = self.suite
        sources = [] if self.baselines_only else self.sources()
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "study.json").write_text(json.dumps({"suite": s.name}, indent=2))  # the report's suite
        if self.progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=len(sources) + s.baseline_seeds, desc=f"study {s.name}", unit="run",
                            dynamic_ncols=True)
        self.baselines()
        for src in sources:
            meta = json.loads((src / "summary.json").read_text())
            self.finetune(src, f"ft-{src.name}", {"kind": "finetune", "pretrain_optimizer": meta["optimizer"],
                                                  "pretrain_batch": meta["batch_size"], "pretrain_seed": meta["seed"],
                                                  "pretrain_test_accuracy": meta.get("test_accuracy")})
        if self.bar is not None:
            self.bar.close()
        return {"suite": s.name, "runs": len(sources), "baselines": s.baseline_seeds}
