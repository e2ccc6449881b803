"""Run a suite: LR sweep at the smallest batch, then the batch ladder with the untuned √ rule.

Resumable: every run lives in ``<out>/runs/<name>``; a finished run (``summary.json``) is never redone, an
interrupted one continues from its last checkpoint. One overall progress bar with an ETA.

Parallel (``jobs`` > 1): the runs of a stage that do not depend on each other (a grid, the optimizers' sweeps, the
ladder's cells, the seeds) train at the same time in ``jobs`` worker processes, each run exactly as it would train
alone (the same code path, its own seed; tested bit for bit against ``jobs=1``). The protocol's order and choices
are unchanged: a stage starts when the results it reads exist. One study process per folder: a second one on the
same folder is refused (``<out>/.study.lock``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import threading
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

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


T = TypeVar("T")
R = TypeVar("R")
LOCK_FILE = ".study.lock"


class StudyBusyError(RuntimeError):
    """Another study process holds the folder."""


@contextlib.contextmanager
def study_lock(out: Path):
    """Hold ``<out>/.study.lock`` (an advisory lock the kernel drops when the process ends, even killed) while a
    runner trains into ``out``: two processes training the same runs would overwrite each other's checkpoints."""
    try:
        import fcntl
    except ImportError:  # no advisory locks here (Windows): nothing to guard with
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise StudyBusyError(f"another study process (pid {holder}) is training into {out}; wait for it to end "
                                 f"or stop it (its runs resume from their checkpoints), then rerun") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()  # the lock itself goes with the file handle


_WORKER: "SuiteRunner | None" = None


def _source_stamp() -> str:
    """A hash of the largebatch sources as they are on disk now."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


#: the sources this process imported (read at its import): a worker spawned later must run the same code
CODE_STAMP = _source_stamp()


def _worker_init(tune_allocator: bool, parent: int, stamp: str) -> None:
    if stamp != CODE_STAMP:
        raise RuntimeError(f"the largebatch sources changed on disk while this study ran (stamp {stamp} at its start, "
                           f"{CODE_STAMP} now): its workers would run other code than it; rerun the study (it "
                           f"resumes: finished runs are kept, interrupted ones continue from their checkpoints)")
    if tune_allocator:
        from ..train.allocator import keep_freed_memory

        keep_freed_memory()
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True, name="largebatch-parent-watch").start()


def _exit_with_parent(parent: int, every_s: float = 1.0) -> None:
    """End this worker within a second of the study process that started it (killed, or stopped without
    shutting the pool down): an orphan would go on writing into a run that a new study process resumes.
    Ending anywhere is safe: the trainer resumes bit-identically from a kill at any point."""
    import time

    while os.getppid() == parent:
        time.sleep(every_s)
    os._exit(1)


def _worker_train(runner_cls: type, suite: Suite, out: str, threads: int | None, verbose: bool, spec: dict) -> dict:
    """One run in a worker process: a runner per process (its task cache lives as long as the worker)."""
    global _WORKER
    if _WORKER is None or type(_WORKER) is not runner_cls or _WORKER.suite != suite or str(_WORKER.out) != out:
        _WORKER = runner_cls(suite, out, threads=threads, progress=False, verbose=verbose)
    return _WORKER._train_local(**spec)


class SuiteRunner:
    max_tasks = 8  # tasks kept built (one per seed and task options); the oldest is dropped beyond this

    def __init__(self, suite: Suite, out: str | Path, *, threads: int | None = None, progress: bool = True,
                 verbose: bool = False, baselines_only: bool = False, jobs: int = 1):
        if not isinstance(jobs, int) or jobs < 1:
            raise ValueError(f"Invalid jobs: {jobs!r} (allowed: an integer >= 1)")
        if jobs > 1 and threads is None:  # the cores shared out between the runs that train at once
            threads = max(1, (os.cpu_count() or 1) // jobs)
        self.suite, self.out = suite, Path(out)
        self.threads, self.progress, self.verbose = threads, progress, verbose
        self.baselines_only = baselines_only  # only the baselines, no training run (nor study.json) touched
        self.jobs = jobs
        self.runs_dir = self.out / "runs"
        self._tasks: dict[str, Any] = {}
        self.bar = None
        self._lock = threading.Lock()  # the progress bar and the in-flight table, shared by a stage's threads
        self._pool: ProcessPoolExecutor | None = None
        self._inflight: dict[str, Future] = {}

    # ------------------------------------------------------------------ parallel stages
    def _each(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """``[fn(x) for x in items]``; with ``jobs`` > 1 the calls run at the same time (threads that wait on the
        worker processes; the compute is bounded by the pool). Every call is waited for before the first
        error, if any, is raised: no run is left half-reported."""
        items = list(items)
        if self.jobs == 1 or len(items) < 2:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=len(items)) as ex:
            futures = [ex.submit(fn, x) for x in items]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise errors[0]
        return [f.result() for f in futures]

    def _train(self, spec: dict) -> dict:
        """Train one run here (``jobs`` = 1) or in a worker process; a run asked for twice at once is trained once."""
        if self.jobs == 1:
            return self._train_local(**spec)
        key = str(spec["run_dir"])
        with self._lock:
            future = self._inflight.get(key)
            if future is None:
                if self._pool is None:
                    import multiprocessing

                    from ..train.allocator import freed_memory_kept

                    self._pool = ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn"),
                                                     initializer=_worker_init,
                                                     initargs=(freed_memory_kept(), os.getpid(), CODE_STAMP))
                    for started in [self._pool.submit(os.getpid) for _ in range(self.jobs)]:
                        started.result()  # every worker now, importing the same sources as this process
                future = self._pool.submit(_worker_train, type(self), self.suite, str(self.out), self.threads,
                                           self.verbose, spec)
                self._inflight[key] = future
        try:
            return future.result()
        except BrokenProcessPool:
            raise RuntimeError(f"a study worker process ended abruptly while training {key} (killed for memory? try "
                               "fewer --jobs; or its start failed: see its error above); from a Python script, start "
                               "the runner under `if __name__ == '__main__':` (workers are spawned and import the "
                               "script). Rerun to resume: finished runs are kept, interrupted ones continue from "
                               "their checkpoints") from None
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    def close(self) -> None:
        """Stop the worker processes (a run in flight is interrupted; it resumes from its checkpoint)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    # ------------------------------------------------------------------ one run
    def _task(self, options: dict):
        """A task per (options, seed), built once; each run starts from the seed's pristine weights."""
        import copy

        from ..tasks import build_task

        key = json.dumps(options, sort_keys=True)
        if key not in self._tasks:
            while len(self._tasks) >= self.max_tasks:
                self._tasks.pop(next(iter(self._tasks)))
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
        label = "-".join(f"b{p['batch_size']}x{p['seq_len']}" for p in phases)
        base = f"base{base_lr:.3g}"  # in the names: a study whose base LR changed trains these again

        def one(seed_twin: tuple[int, bool]) -> dict:
            seed, twin = seed_twin
            if twin:
                return self.run_one(opt, tp["twin_batch"], twin_lr, seed, extra_task_options=options, epochs=epochs,
                                    name=f"twin-{opt}-{base}-b{tp['twin_batch']}-len{tp['seq_len']}-s{seed}",
                                    tags={"kind": "two-phase-twin", "seq_len": tp["seq_len"]})
            return self.run_one(opt, phases[-1]["batch_size"], phases[-1]["lr"], seed, extra_task_options=options,
                                phases=phases, name=f"two-phase-{opt}-{base}-{label}-s{seed}",
                                tags={"kind": "two-phase", "seq_len": tp["seq_len"], "phases": phases})

        return self._each(one, [(seed, twin) for seed in range(tp["seeds"]) for twin in (True, False)])

    def run_one(self, optimizer: str, batch: int, lr: float, seed: int, *, extra_task_options: dict | None = None,
                name: str | None = None, tags: dict | None = None, phases: list[dict] | None = None,
                epochs: float | None = None, eval_points: int | None = None, overrides: dict | None = None) -> dict:
        """Train one configuration (or read its finished summary). ``eval_points``: evaluations over the
        schedule (default: the suite's); ``overrides``: TrainConfig fields set on top (the noise probe's)."""
        run_dir = self.runs_dir / (name or run_name(optimizer, batch, lr, seed))
        done = run_dir / "summary.json"
        done_before = done.exists()
        if done_before:
            summary = json.loads(done.read_text())
        else:
            summary = self._train(dict(run_dir=run_dir, optimizer=optimizer, batch=batch, lr=lr, seed=seed,
                                       extra_task_options=extra_task_options, phases=phases, epochs=epochs,
                                       eval_points=eval_points, overrides=overrides))
        if not done_before or (tags or {}).get("kind") == "ladder" or "kind" not in summary:
            # a finished run read back by another stage keeps its kind; the ladder claims the runs it shares
            # (the chosen sweep run, the √-rule run of the tuned grid)
            summary.update(tags or {})
        summary.update({"optimizer": optimizer, "batch_size": batch, "lr": lr, "seed": seed, "run": run_dir.name})
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        with self._lock:
            if self.bar is not None:
                if done_before:  # counted, but kept out of the rate: the ETA is that of runs actually trained
                    self.bar.n += 1
                    self.bar.last_print_n += 1
                    self.bar.refresh()
                else:
                    self.bar.update(1)
                self.bar.set_postfix(run=run_dir.name)
        return summary

    def _train_local(self, run_dir: Path, optimizer: str, batch: int, lr: float, seed: int,
                     extra_task_options: dict | None, phases: list[dict] | None, epochs: float | None,
                     eval_points: int | None, overrides: dict | None) -> dict:
        """Train one run in this process (resumed from its checkpoint if it has one); its summary."""
        import io

        from ..checkpoint import list_checkpoints
        from ..train.allocator import release_freed_memory
        from ..train.config import DATA_FIELDS
        from ..train.loop import TrainConfig, train

        s = self.suite
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
        sink = contextlib.nullcontext() if self.verbose else contextlib.redirect_stdout(io.StringIO())
        try:
            with sink:
                return train(cfg, resume=resume, task=task)
        finally:
            release_freed_memory()  # the run's peak heap back to the system before the next run

    # ------------------------------------------------------------------ the protocol
    def _grow(self, n: int) -> None:
        """The plan grew by ``n`` runs (a grid extension, a refinement, a third seed)."""
        with self._lock:
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
        order = [(optimizer, sorted(grid)[i]) for i in middle_out(max(len(g) for g in grids.values()))
                 for optimizer, grid in grids.items() if i < len(grid)]
        self._each(lambda o_lr: self.run_one(o_lr[0], batch, o_lr[1], 0, tags={"kind": kind}), order)

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

    def ladder(self, chosen: dict[str, float], batches: tuple[int, ...]) -> None:
        """Every optimizer's ladder runs at ``batches`` (the √ rule from its base LR), all seeds."""
        s = self.suite
        cells = [(o, batch, schedules.scale_lr(base, s.batches[0], batch, s.scaling), seed)
                 for o, base in chosen.items() for batch in batches for seed in range(self.seeds_at(batch))]
        self._each(lambda c: self.run_one(*c, tags={"kind": "ladder"}), cells)

    def tuned_seeds(self, tuned: dict[str, float], seeds: int) -> list[dict]:
        b1 = self.suite.batches[-1]
        cells = [(o, lr, seed) for o, lr in tuned.items() for seed in range(seeds)]
        return self._each(lambda c: self.run_one(c[0], b1, c[1], c[2], tags={"kind": "tuned"}), cells)

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
        runs = [(label.split(":")[0], b, lrs[(label, b)], seed, "tuned" if ":" in label else "ladder")
                for label, b in todo for seed in range(len(cells[(label, b)]), s.seeds_max)]
        self._each(lambda r: self.run_one(*r[:4], tags={"kind": r[4]}), runs)

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
        """Run the protocol into ``out`` (resuming what exists), holding the folder's lock; the workers are
        stopped at the end, even on an error."""
        with study_lock(self.out):
            try:
                return self._protocol()
            finally:
                self.close()

    def _protocol(self) -> dict:
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
        opts = list(s.lr_grids)
        tuned = dict(zip(opts, self._each(lambda o: self.sweep(o, s.batches[-1], self.tuned_grid(o),
                                                                kind="tuned-sweep")[0], opts))) if control else {}
        self._save(tuned=tuned)
        self.tuned_seeds(tuned, s.seeds_largest)  # cheap (the largest batch): each optimizer's best, seeded
        self.prime(s.batches[0], s.lr_grids, "sweep")
        chosen = dict(zip(opts, self._each(lambda o: self.sweep(o)[0], opts)))
        self._save(chosen, tuned)
        self.ladder(chosen, s.batches[-1:])
        self.ladder(chosen, s.batches[:-1])
        self.more_seeds(chosen, tuned)
        if s.noise_probe:  # after the smallest batch's ladder runs: they say where the probe may stop
            self._each(lambda o: self.noise_probe(o, chosen[o]), opts)
        if s.long_baseline:
            self._each(lambda o: self.long_baseline(o, chosen[o]), opts)
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
        from ..checkpoint import checkpoint_entry, list_checkpoints

        from .analysis import mark_superseded

        s = self.suite
        source = self.out.parent / s.source / "runs"
        summaries = {p: {**json.loads((p / "summary.json").read_text()), "dir": p} for p in source.glob("*")
                     if (p / "summary.json").exists()}
        state = self.out.parent / s.source / "study.json"
        base_lr = json.loads(state.read_text()).get("base_lr") if state.exists() else None
        current = mark_superseded(list(summaries.values()), base_lr, get_suite(s.source))  # not the old ladders
        sources = sorted(r["dir"] for r in current if r.get("kind") == "ladder")
        if not sources:
            raise FileNotFoundError(f"no finished {s.source} runs under {source}: run `largebatch study {s.source}` first")
        found = {p: list_checkpoints(p) for p in sources}
        missing = [p.name for p in sources if not found[p]]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(sources)} {s.source} runs have no checkpoint (ckpt-*.pt) to fine-tune from: "
                f"{', '.join(missing)}. Retrain them on this machine: move those folders out of {source} and rerun "
                f"`largebatch study {s.source} --out {self.out.parent / s.source}` (it trains only the runs it lacks), "
                f"or run only the baselines with --baselines-only")
        unchecked = [p.name for p in sources if checkpoint_entry(found[p][-1], "input_fingerprint") is None]
        if unchecked:
            raise ValueError(
                f"{len(unchecked)} of {len(sources)} {s.source} runs have a checkpoint without a tokenizer fingerprint "
                f"(written by an older largebatch, when WordPiece ids changed from process to process): "
                f"{', '.join(unchecked)}; their token ids cannot be matched to the tokenizer rebuilt here. Retrain "
                f"them: move those folders out of {source} and rerun `largebatch study {s.source} --out "
                f"{self.out.parent / s.source}`")
        return sources

    max_tasks = 1  # the encoder differs per source run

    def finetune(self, checkpoint: Path, label: str, tags: dict, long: bool = False) -> dict:
        """Fine-tune ``checkpoint`` with the recipe into ``ft-<label>``; ``long``: for ``long_baseline`` times
        its epochs, into ``ft-long-<label>-e<epochs>``."""
        optimizer, (lr,) = next(iter(self.suite.lr_grids.items()))
        epochs = self.suite.epochs * self.suite.long_baseline if long and self.suite.long_baseline else None
        name = f"ft-{label}"
        if epochs is not None:
            name, tags = f"ft-long-{label}-e{epochs:g}", {**tags, "kind": f"{tags['kind']}-long", "epochs": epochs}
        return self.run_one(optimizer, self.suite.batches[0], lr, 0, extra_task_options={"checkpoint": str(checkpoint)},
                            name=name, tags=tags, epochs=epochs)

    def long_sources(self, sources: list[Path]) -> list[Path]:
        """The pre-trained encoders the longer recipe also fine-tunes: the smallest and the largest pre-training
        batch of each optimizer, seeds 0 and 1."""
        if not self.suite.long_baseline:
            return []
        metas = {src: json.loads((src / "summary.json").read_text()) for src in sources}
        batches = [m["batch_size"] for m in metas.values()]
        ends = {min(batches), max(batches)} if batches else set()
        return [src for src, m in metas.items() if m["batch_size"] in ends and m.get("seed", 0) < 2]

    def baselines(self) -> None:
        """The random-initialisation encoders (one per seed) fine-tuned with the recipe, then TF-IDF."""
        from .baselines import random_encoder, tfidf_logreg

        s = self.suite
        pre = get_suite(s.source)
        encoders = [random_encoder(pre.task, pre.task_options, seed, self.runs_dir / f"random-encoder-s{seed}")
                    for seed in range(s.baseline_seeds)]
        self._each(lambda job: self.finetune(encoders[job[0]], f"random-encoder-s{job[0]}",
                                             {"kind": "finetune-baseline", "baseline": RANDOM_ENCODER,
                                              "pretrain_seed": job[0]}, long=job[1]),
                   [(seed, long) for long in ((False, True) if s.long_baseline else (False,))
                    for seed in range(s.baseline_seeds)])
        done = self.runs_dir / "tfidf-logreg" / "summary.json"
        if encoders and not done.exists():  # the last fine-tuned task: the same splits and tokens as every run
            task = self._task({**s.task_options, "checkpoint": str(encoders[-1]), "seed": 0})
            done.parent.mkdir(parents=True, exist_ok=True)
            done.write_text(json.dumps({"kind": "finetune-baseline", "baseline": "TF-IDF + logistic regression",
                                        "run": "tfidf-logreg", **tfidf_logreg(task.data)}, indent=2))

    def _protocol(self) -> dict:
        s = self.suite
        sources = [] if self.baselines_only else self.sources()
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "study.json").write_text(json.dumps({"suite": s.name}, indent=2))  # the report's suite
        long_sources = self.long_sources(sources)
        if self.progress:
            from tqdm.auto import tqdm
            long = len(long_sources) + s.baseline_seeds if s.long_baseline else 0
            self.bar = tqdm(total=len(sources) + s.baseline_seeds + long, desc=f"study {s.name}", unit="run",
                            dynamic_ncols=True)
        self.baselines()

        def finetune(src: Path, long: bool = False) -> dict:
            meta = json.loads((src / "summary.json").read_text())
            return self.finetune(src, src.name, {"kind": "finetune", "pretrain_optimizer": meta["optimizer"],
                                                         "pretrain_batch": meta["batch_size"],
                                                         "pretrain_seed": meta["seed"],
                                                         "pretrain_test_accuracy": meta.get("test_accuracy")}, long)

        self._each(finetune, sources)
        self._each(lambda src: finetune(src, long=True), long_sources)
        if self.bar is not None:
            self.bar.close()
        return {"suite": s.name, "runs": len(sources), "baselines": s.baseline_seeds}
