"""Sharded LAMB/LARS (FSDP2 on 2 gloo processes) equal the unsharded optimizers step by step."""
import json
import socket
import time

import pytest
import torch.multiprocessing as mp

import dist_workers

pytestmark = pytest.mark.distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Hung(RuntimeError):
    """The workers did not finish within the attempt's time limit."""


def _spawn(fn, *args, attempts=3, timeout_s=300):
    """Run ``fn`` on 2 gloo processes. A worker that crashes or hangs (not a wrong result: results are checked
    in this process) is retried with a fresh port: on this shared machine a port can be taken between choosing
    it and binding it, gloo has been seen to abort at teardown, and once (in a fresh venv) both workers of a
    finished job stayed blocked on exit. A real bug fails every attempt."""
    for attempt in range(attempts):
        context = mp.start_processes(fn, args=(2, _free_port(), *args), nprocs=2, join=False,
                                     start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not context.join(timeout=2):
                if time.monotonic() > deadline:
                    for p in context.processes:
                        p.kill()
                        p.join()
                    raise _Hung(f"{fn.__name__}: no result within {timeout_s} s")
            return
        except (mp.ProcessExitedException, mp.ProcessRaisedException, _Hung):
            if attempt == attempts - 1:
                raise


def _run(tmp_path, per_slice):
    out = tmp_path / "diffs.json"
    _spawn(dist_workers.fsdp_vs_unsharded, str(out), per_slice)
    return json.loads(out.read_text())


def test_fsdp2_sharded_equals_unsharded(tmp_path):
    diffs = _run(tmp_path, per_slice=False)
    assert set(diffs) == set(dist_workers.CASES)
    for name, d in diffs.items():
        assert d < 1e-12, (name, d)  # float64, 5 steps: equal up to summation order


def test_per_slice_norms_are_caught(tmp_path):
    """The same test with the cross-rank norm reduction removed must fail (the test can fail)."""
    diffs = _run(tmp_path, per_slice=True)
    trusting = [n for n in diffs if n != "lamb_no_trust"]
    assert all(diffs[n] > 1e-6 for n in trusting), diffs
    assert diffs["lamb_no_trust"] < 1e-12  # no trust ratio: nothing depends on the norms


def test_zero_redundancy_optimizer_equals_unsharded(tmp_path):
    out = tmp_path / "zero.json"
    _spawn(dist_workers.zero_vs_unsharded, str(out))
    diffs = json.loads(out.read_text())
    assert len(diffs) == 4 and all(d < 1e-12 for d in diffs.values()), diffs


def test_a_stuck_rank_ends_the_collective_after_dist_timeout(tmp_path):
    """Rank 1 is stopped (SIGSTOP); rank 0's all-reduce fails after the 2 s timeout with one line, instead of
    hanging for torch's default 30 minutes."""
    import multiprocessing

    out = tmp_path / "stuck.json"
    spawn, port = multiprocessing.get_context("spawn"), _free_port()
    procs = [spawn.Process(target=dist_workers.stuck_peer, args=(rank, 2, port, str(out), 2.0)) for rank in range(2)]
    for p in procs:
        p.start()
    try:
        procs[0].join(120)
        assert procs[0].exitcode == 0
    finally:
        for p in procs:
            p.kill()
            p.join()
    result = json.loads(out.read_text())
    assert result["type"] == "CollectiveTimeout", result
    assert result["error"] == ("rank 0 of 2: no answer from the other process(es) within dist_timeout=2 s: "
                               "a rank is stuck or dead")
    assert 1.9 < result["waited_s"] < 30


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan"), "10", True])
def test_dist_timeout_is_validated(bad):
    from largebatch.train.distributed import check_timeout

    with pytest.raises(ValueError, match=r"Invalid dist_timeout: .* \(allowed: a finite number of seconds > 0\)"):
        check_timeout(bad)
