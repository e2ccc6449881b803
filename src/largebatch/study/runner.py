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
from .suites import Suite


def run_name(optimizer: str, batch: int, lr: float, seed: int) -> str:
    return f"{optimizer}-b{batch}-lr{lr:.3g}-s{seed}"


class SuiteRunner:
    def __init__(self, suite: Suite, out: str | Path, *, threads: int | None = None, progress: bool = True,
                 verbose: bool = False):
        self.suite, self.out = suite, Path(out)
        self.threads, self.progress, self.verbose = threads, progress, verbose
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
                epochs: float | None = None) -> dict:
        """Train one configuration (or read its finished summary)."""
        from ..train.checkpoint import list_checkpoints
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
                task=s.task, task_options={k: v for k, v in task_options.items() if k != "seed"},
                optimizer=optimizer, optimizer_options=dict(s.optimizer_options.get(optimizer, {})),
                batch_size=batch, micro_batch_size=min(batch, s.micro_batch_size), lr=lr,
                warmup_steps=min(s.warmup_steps, total), epochs=epochs, seed=seed, phases=phases,
                eval_every=max(1, math.ceil(total / s.eval_points)), checkpoint_every=max(1, math.ceil(total / 4)),
                trust_every=max(1, math.ceil(total / 40)),
                keep_checkpoints=1, out=str(run_dir), threads=self.threads, progress=self.verbose, plot=False)
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
    def sweep(self, optimizer: str) -> tuple[float, list[dict]]:
        """Base LR at the smallest batch, by validation loss; extend the grid while the best is at an edge."""
        s = self.suite
        grid = sorted(s.lr_grids[optimizer])
        results: dict[float, dict] = {}
        for extension in range(s.extend_grid + 1):
            for lr in grid:
                if lr not in results:
                    results[lr] = self.run_one(optimizer, s.batches[0], lr, 0, tags={"kind": "sweep"})

            def score(r):
                v = r.get("validation_loss")
                return v if v is not None and math.isfinite(v) and not r.get("diverged") else math.inf

            best = min(results, key=lambda lr: score(results[lr]))
            ordered = sorted(results)
            if len(ordered) < 2 or (best != ordered[0] and best != ordered[-1]) or extension == s.extend_grid:
                break  # inside the grid, or no extension left (the report then calls the choice provisional)
            step = ordered[1] / ordered[0] if len(ordered) > 1 else 3.0
            new = best / step if best == ordered[0] else best * step
            grid = [new]
            if self.bar is not None:
                self.bar.total += 1
                self.bar.refresh()
        return best, list(results.values())

    def plan_size(self) -> int:
        s = self.suite
        sweep = sum(len(g) for g in s.lr_grids.values())
        ladder = sum((s.seeds_largest if b == s.batches[-1] else s.seeds) for b in s.batches) * len(s.lr_grids)
        two_phase = 2 * s.two_phase["seeds"] if s.two_phase else 0
        # the smallest batch's seed-0 ladder run is the chosen sweep run: read back, and counted again
        return sweep + ladder + two_phase

    def run(self) -> dict:
        s = self.suite
        self.out.mkdir(parents=True, exist_ok=True)
        if self.progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=self.plan_size(), desc=f"study {s.name}", unit="run", dynamic_ncols=True)
        chosen = {}
        for optimizer in s.lr_grids:
            best, _ = self.sweep(optimizer)
            chosen[optimizer] = best
            for batch in s.batches:
                lr = schedules.scale_lr(best, s.batches[0], batch, s.scaling)
                for seed in range(s.seeds_largest if batch == s.batches[-1] else s.seeds):
                    self.run_one(optimizer, batch, lr, seed, tags={"kind": "ladder"})
        if s.two_phase:
            self.two_phase(chosen[s.two_phase["optimizer"]])
        if self.bar is not None:
            self.bar.close()
        state = {"suite": s.name, "base_lr": chosen}
        (self.out / "study.json").write_text(json.dumps(state, indent=2))
        return state


class FinetuneRunner(SuiteRunner):
    """Fine-tune every ladder run of the source suite (``<out>/../<source>``) with one fixed recipe."""

    def run(self) -> dict:
        s = self.suite
        source = self.out.parent / s.source / "runs"
        sources = sorted(p for p in source.glob("*") if (p / "summary.json").exists()
                         and json.loads((p / "summary.json").read_text()).get("kind") == "ladder")
        if not sources:
            raise FileNotFoundError(f"no finished {s.source} runs under {source}: run `largebatch study {s.source}` first")
        from ..train.checkpoint import list_checkpoints

        # checked before any work: a study copied without its checkpoints (they are not committed) fails here
        missing = [p.name for p in sources if not list_checkpoints(p)]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(sources)} {s.source} runs have no checkpoint (ckpt-*.pt) to fine-tune from: "
                f"{', '.join(missing)}. Retrain them on this machine: move those folders out of {source} and rerun "
                f"`largebatch study {s.source} --out {self.out.parent / s.source}` (it trains only the runs it lacks)")
        self.out.mkdir(parents=True, exist_ok=True)
        if self.progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=len(sources), desc=f"study {s.name}", unit="run", dynamic_ncols=True)
        optimizer, (lr,) = next(iter(s.lr_grids.items()))
        for src in sources:
            meta = json.loads((src / "summary.json").read_text())
            self._tasks.clear()  # the encoder differs per source run
            self.run_one(optimizer, s.batches[0], lr, 0, extra_task_options={"checkpoint": str(src)},
                         name=f"ft-{src.name}",
                         tags={"kind": "finetune", "pretrain_optimizer": meta["optimizer"],
                               "pretrain_batch": meta["batch_size"], "pretrain_seed": meta["seed"],
                               "pretrain_test_accuracy": meta.get("test_accuracy")})
        if self.bar is not None:
            self.bar.close()
        return {"suite": s.name, "runs": len(sources)}
