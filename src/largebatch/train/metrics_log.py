"""What a run writes as it goes: metrics.jsonl, trust.jsonl, TensorBoard scalars and the progress bar.

Only the main process writes; on the others :class:`RunLog` does nothing. On resume, records after the
checkpoint's step are dropped first, so a resumed run's files equal a straight run's.

The files are strict JSON (RFC 8259 has no NaN or Infinity): a non-finite number is written as ``null``
and its key listed in the record's ``"nonfinite"`` field (:func:`strict_json`).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from .run_folder import trim_jsonl


def strict_json(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with each non-finite float replaced by ``None`` and its key listed under ``"nonfinite"``."""
    bad = sorted(k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v))
    if not bad:
        return record
    return {**{k: (None if k in bad else v) for k, v in record.items()}, "nonfinite": bad}


def dumps(record: dict[str, Any], **kw) -> str:
    """Strict JSON text of a record (see :func:`strict_json`)."""
    return json.dumps(strict_json(record), allow_nan=False, **kw)


def tensorboard_writer_class():
    """TensorBoard's ``SummaryWriter``, or an ImportError that names the install command."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ImportError("TensorBoard logging needs the tensorboard package: pip install 'largebatch[tensorboard]' "
                          f"(or pip install tensorboard); {exc}") from None
    return SummaryWriter


def scalars(record: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def trust_ratios(optimizer) -> dict[str, float]:
    """Per-tensor trust ratios of the last step, by parameter name ({} for optimizers without them)."""
    telemetry = getattr(optimizer, "telemetry", None)
    return {name: v["trust_ratio"] for name, v in telemetry().items()} if telemetry is not None else {}


def trust_summary(optimizer) -> dict[str, float]:
    """Mean, min and max of the last step's trust ratios ({} for optimizers without them)."""
    ratios = list(trust_ratios(optimizer).values())
    if not ratios:
        return {}
    return {"trust_ratio_mean": sum(ratios) / len(ratios), "trust_ratio_min": min(ratios),
            "trust_ratio_max": max(ratios)}


class JsonlLog:
    """A JSON-lines file of a run; on resume, records after the checkpoint's step are dropped first (atomically;
    a line torn by a kill is dropped with a note)."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None:
            note = trim_jsonl(path, resume_step)
            if note:
                print(f"note: {note}", file=sys.stderr, flush=True)
        elif path.exists():
            path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(dumps(record) + "\n")


class RunLog:
    """The run's logs. ``writer_cls``: TensorBoard's SummaryWriter, or ``None`` for no TensorBoard."""

    def __init__(self, out: Path, *, enabled: bool, resume_step: int | None, start_step: int, total_steps: int,
                 trust_every: int, progress: bool, writer_cls=None):
        self.enabled, self.trust_every = enabled, trust_every
        self.metrics = JsonlLog(out / "metrics.jsonl", resume_step) if enabled else None
        self.trust = JsonlLog(out / "trust.jsonl", resume_step) if enabled else None
        self.tb = writer_cls(str(out / "tensorboard")) if enabled and writer_cls is not None else None
        self.bar = None
        if enabled and progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def write(self, record: dict[str, Any], optimizer, *, is_last: bool) -> None:
        """Log one step's record; the per-tensor trust ratios every ``trust_every`` steps, first and last."""
        if not self.enabled:
            return
        step = record["step"]
        self.metrics.write(record)
        if self.tb is not None:
            for k, v in scalars(record).items():
                self.tb.add_scalar(k, v, step)
        if self.trust_every and (step % self.trust_every == 0 or is_last or step == 1):
            trust = trust_ratios(optimizer)
            if trust:
                self.trust.write({"step": step, "trust_ratio": trust})
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                 sps=f"{record['samples_per_s']:.0f}")
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
