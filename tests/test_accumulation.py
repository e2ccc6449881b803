"""k micro-batches == one batch k× larger, including uneven micro-batches and token-count losses."""
import torch
from torch import nn

from largebatch.train.accumulation import accumulate_gradients, split_indices


def _token_loss(model, batch):
    # a per-token loss whose count varies per sample (mask), like MLM
    logits = model(batch["x"])
    per = nn.functional.cross_entropy(logits.transpose(1, 2), batch["y"], reduction="none")
    mask = batch["mask"]
    return (per * mask).sum(), int(mask.sum())


def _data(n=10, t=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n, t), generator=g)
    mask = (torch.rand(n, t, generator=g) < 0.5).double()
    mask[0] = 1.0
    return {"x": x, "y": y, "mask": mask}


def test_accumulation_equals_one_big_batch_with_uneven_micro_batches():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    data = _data()
    big_loss, big_count = _token_loss(model, data)
    (big_loss / big_count).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    idx = split_indices(torch.arange(10), 4)     # 4 + 4 + 2: the last micro-batch is shorter
    assert [len(i) for i in idx] == [4, 4, 2]
    micro = [{k: v[i] for k, v in data.items()} for i in idx]
    loss, count = accumulate_gradients(model, micro, _token_loss, count_fn=lambda b: int(b["mask"].sum()))
    assert count == big_count
    assert abs(loss - float(big_loss.detach()) / big_count) < 1e-12
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-12, atol=1e-14)


def test_mean_of_means_would_differ():
    """Guard the test itself: the naive normalisation (mean of micro-batch means) gives another gradient."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    data = _data()
    big_loss, big_count = _token_loss(model, data)
    (big_loss / big_count).backward()
    expected = model.weight.grad.clone()
    model.zero_grad()
    for i in split_indices(torch.arange(10), 4):
        s, c = _token_loss(model, {k: v[i] for k, v in data.items()})
        (s / c / 3).backward()
    assert not torch.allclose(model.weight.grad, expected)


def test_no_sync_wraps_all_but_last():
    calls = []

    class Ctx:
        def __enter__(self):
            calls.append("enter")

        def __exit__(self, *a):
            return False

    model = nn.Linear(4, 3).double()
    data = _data()
    micro = [{k: v[i] for k, v in data.items()} for i in split_indices(torch.arange(10), 4)]
    accumulate_gradients(model, micro, _token_loss, count_fn=lambda b: int(b["mask"].sum()), no_sync=Ctx)
    assert calls == ["enter", "enter"]
