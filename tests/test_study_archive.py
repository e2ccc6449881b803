"""Compacting a finished study keeps every evaluation, never touches unfinished runs, and the report still builds."""
import json

from largebatch.study.archive import compact_run, compact_study


def _run(dirpath, steps, eval_every, finished=True):
    dirpath.mkdir(parents=True)
    lines = []
    for s in range(1, steps + 1):
        r = {"step": s, "samples": 16 * s, "lr": 1e-3, "loss": 2.0 / s, "samples_per_s": 1600.0}
        if s % eval_every == 0:
            r["validation_accuracy"] = s / steps
        lines.append(json.dumps(r))
    (dirpath / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if finished:
        (dirpath / "summary.json").write_text(json.dumps({"optimizer": "lamb", "batch_size": 16}))


def test_compact_keeps_evaluations_ends_and_marks_the_summary(tmp_path):
    run = tmp_path / "runs" / "a"
    _run(run, 1000, 77)
    kept, total = compact_run(run, max_records=50)
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert total == 1000 and kept == len(recs) < 80
    steps = [r["step"] for r in recs]
    assert steps[0] == 1 and steps[-1] == 1000 and steps == sorted(steps)
    assert [r["step"] for r in recs if "validation_accuracy" in r] == list(range(77, 1001, 77))
    assert json.loads((run / "summary.json").read_text())["metrics_compacted"] == {"kept": kept, "of": 1000, "every": 20}
    assert compact_run(run, max_records=1000) == (kept, kept)  # idempotent once small


def test_unfinished_runs_are_left_alone(tmp_path):
    _run(tmp_path / "runs" / "done", 300, 50)
    _run(tmp_path / "runs" / "running", 300, 50, finished=False)
    before = (tmp_path / "runs" / "running" / "metrics.jsonl").read_text()
    changed = compact_study(tmp_path, max_records=30)
    assert [c[0] for c in changed] == ["done"]
    assert (tmp_path / "runs" / "running" / "metrics.jsonl").read_text() == before


def test_the_steps_to_a_training_loss_target_survive_compaction(tmp_path):
    """The noise check's steps to a training-loss target (a trailing mean over 5% of the records) read from the
    thinned log as from the full one, within one kept block; a plain subsample (no block means) moves further."""
    import random

    from largebatch.study.noise_check import loss_steps

    rng = random.Random(0)
    run = tmp_path / "runs" / "noisy"
    run.mkdir(parents=True)
    lines = [json.dumps({"step": s, "samples": 16 * s, "loss": 6.0 - s / 2000 + rng.gauss(0, 0.6),
                         "samples_per_s": 1600.0}) for s in range(1, 20001)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "summary.json").write_text(json.dumps({"optimizer": "lamb", "batch_size": 16}))
    targets = (5.0, 3.5, 2.0)
    full = [loss_steps({16: [run]}, t)[16][0] for t in targets]
    compact_run(run, max_records=500)  # every 40th record kept
    thinned = [loss_steps({16: [run]}, t)[16][0] for t in targets]
    assert all(abs(a - b) <= 40 for a, b in zip(full, thinned)), (full, thinned)
    plain = tmp_path / "plain.jsonl"  # the same kept records without their block means (an older compaction)
    plain.write_text("".join(json.dumps({k: v for k, v in json.loads(line).items() if not k.startswith("loss_block")})
                             + "\n" for line in (run / "metrics.jsonl").read_text().splitlines()))
    (run / "metrics.jsonl").write_text(plain.read_text())
    subsample = [loss_steps({16: [run]}, t)[16][0] for t in targets]
    assert max(abs(a - b) for a, b in zip(full, subsample)) > 40, (full, subsample)
