"""The study's decision rules (grid extension, near-tie refinement, third seeds) and the runner's plan, on a
stubbed trainer: which runs it asks for, in which order, and what it writes to study.json."""
import json
import math

import pytest

from largebatch.study import rules
from largebatch.study.runner import SuiteRunner, middle_out
from largebatch.study.suites import SUITES, Suite


def test_extension_goes_beyond_the_edge_with_the_best():
    assert rules.extension({1e-3: 2.0, 3e-3: 1.5, 1e-2: 1.0}) == pytest.approx(1e-2 * 3 / 1)
    assert rules.extension({1e-3: 1.0, 3e-3: 1.5}) == pytest.approx(1e-3 / 3)
    assert rules.extension({1e-3: 2.0, 3e-3: 1.0, 1e-2: 1.5}) is None


def test_refinement_only_for_a_near_tie():
    clear = {1e-3: 2.0, 3e-3: 1.0, 1e-2: 1.5}
    assert rules.refinement(clear, 0.02, math.sqrt(3)) == []
    tie = {1e-3: 2.0, 3e-3: 1.0, 1e-2: 1.019}
    assert rules.refinement(tie, 0.02, math.sqrt(3)) == pytest.approx([3e-3 / math.sqrt(3), 3e-3 * math.sqrt(3)])
    assert rules.refinement({1e-3: 1.0, 3e-3: math.inf}, 0.02, 2.0) == []  # a diverged run is no tie
    assert rules.refinement({1e-3: 1.0, 2e-3: 1.001}, 0.02, 2.0) == pytest.approx([5e-4])  # 2e-3 is there


def test_a_third_seed_where_the_spreads_overlap_the_difference():
    cells = {("lamb", 16): [0.80, 0.82], ("lamb", 64): [0.79, 0.81], ("adamw", 16): [0.80, 0.81],
             ("adamw", 64): [0.60, 0.61], ("lamb", 256): [0.80, 0.80, 0.81]}
    pairs = rules.judged_pairs(["lamb", "adamw"], (16, 64))
    assert rules.cells_needing_seeds(cells, pairs, 3) == {("lamb", 16), ("lamb", 64)}
    assert not rules.overlaps([0.8], [0.8])            # one seed: no spread to compare
    assert rules.overlaps([0.80, 0.82], [0.82, 0.84])      # 0.02 apart, spreads 0.01 + 0.01: within
    assert not rules.overlaps([0.80, 0.82], [0.83, 0.85])  # 0.03 apart: beyond


def fake_summary(optimizer, batch, lr, seed, kind):
    best = {"lamb": 3e-3, "adamw": 1e-3}[optimizer] * math.sqrt(batch / 16)
    val = 1.0 + abs(math.log(lr / best))  # a V in log-LR around the optimizer's own best
    return {"optimizer": optimizer, "batch_size": batch, "lr": lr, "seed": seed, "kind": kind,
            "validation_loss": val, "test_accuracy": 0.8 - 0.01 * seed * (optimizer == "adamw")}


class StubRunner(SuiteRunner):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.calls = []

    def run_one(self, optimizer, batch, lr, seed, *, name=None, tags=None, epochs=None, **_):
        kind = (tags or {}).get("kind")
        self.calls.append((kind, optimizer, batch, lr, seed))
        s = fake_summary(optimizer, batch, lr, seed, kind)
        d = self.runs_dir / (name or f"{optimizer}-b{batch}-lr{lr:.3g}-s{seed}")
        d.mkdir(parents=True, exist_ok=True)
        (d / "summary.json").write_text(json.dumps(s))
        return s


def test_runner_order_tuned_control_first_and_study_json(tmp_path):
    suite = Suite("t", "mlm", batches=(16, 64), epochs=1.0, warmup_steps=1, micro_batch_size=64,
                  lr_grids={"lamb": (1e-3, 3e-3, 1e-2), "adamw": (3e-4, 1e-3, 3e-3)}, seeds=2, seeds_largest=2,
                  long_baseline=2.0)
    r = StubRunner(suite, tmp_path, progress=False)
    state = r.run()
    kinds = [c[0] for c in r.calls]
    # decisive numbers first: the tuned control's grids at the largest batch, interleaved, middle LR first
    assert kinds[:12] == ["tuned-sweep"] * 12 and all(c[2] == 64 for c in r.calls[:12])
    assert [c[1:4] for c in r.calls[:3]] == [("lamb", 64, pytest.approx(6e-3)), ("adamw", 64, pytest.approx(2e-3)),
                                             ("lamb", 64, pytest.approx(2e-3))]
    assert kinds[12:16] == ["tuned"] * 4  # then its seeds, before the slow smallest-batch sweep
    assert kinds[16:28] == ["sweep"] * 12
    assert state["base_lr"] == {"lamb": 3e-3, "adamw": 1e-3}
    assert state["tuned_lr"]["lamb"] == pytest.approx(6e-3) and state["tuned_lr"]["batch"] == 64
    # the tuned grid is the sweep grid moved by the √ rule
    assert sorted(c[3] for c in r.calls[:6] if c[1] == "lamb") == pytest.approx([2e-3, 6e-3, 2e-2])
    assert middle_out(3) == [1, 0, 2] and middle_out(4) == [2, 1, 3, 0]
    assert ("long-baseline", "lamb", 16, 3e-3, 0) in r.calls
    saved = json.loads((tmp_path / "study.json").read_text())
    assert "running" not in saved and saved["base_lr"] == state["base_lr"]


def test_image_scaling_uses_the_recipes_exclusions_and_keeps_the_old_configuration():
    new, old = SUITES["image-scaling"], SUITES["image-scaling-no-exclusions"]
    assert new.optimizer_names == {"lamb": "authors_resnet", "lars": "lars_2017"}
    assert new.ablation == old.name and old.optimizer_names == {} and old.optimizer_options == {}
    assert new.batches == old.batches and new.epochs == old.epochs and new.lr_grids == old.lr_grids
