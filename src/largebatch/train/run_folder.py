"""A run folder (``--out``) belongs to one run.

A fresh run draws a run id (uuid4 hex) and writes it to ``run.json`` in its folder; the id also goes into
every checkpoint and ``summary.json``. A fresh run refuses a folder holding a run that can be resumed or has
finished (a checkpoint or ``summary.json``); the files of a run that left neither (killed before its first
checkpoint) are moved aside into ``aborted-<its id>/``, so nothing is lost and rerunning the command works.
``--resume`` continues a run, after checking that the checkpoint belongs to the folder's run. So retention,
which prunes only this run's checkpoints, and resume never mix two runs.

On start and resume the temp files of writes interrupted by a kill are removed; on resume ``metrics.jsonl``
is trimmed to the checkpoint's step (atomically), dropping a torn last line left by a kill with a note.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from ..checkpoint import checkpoint_run_id, list_checkpoints, remove_stale_temps, write_atomically

RUN_FILE = "run.json"
#: files that make a folder a run's folder (beside ckpt-*.pt)
RUN_FILES = (RUN_FILE, "config.json", "metrics.jsonl", "trust.jsonl", "summary.json")


class RunFolderError(ValueError):
    """The --out folder cannot take this run (one line; the CLI exits 2)."""


def new_run_id() -> str:
    return uuid.uuid4().hex


def check_out(out: Any) -> Path:
    """``out`` as a folder path: not empty (that would be the current folder) and not a file."""
    if not isinstance(out, (str, os.PathLike)) or not str(out).strip():
        raise RunFolderError(f"Invalid out: {out!r} (allowed: a folder path; '' would mean the current folder)")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"Invalid out: {str(out)!r} is a file (allowed: a folder, new or holding this run)")
    return path


def holds_a_run(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in RUN_FILES) or bool(list_checkpoints(run_dir))


def folder_run_id(run_dir: Path) -> str | None:
    """The id of the run a folder holds: run.json's, else its newest checkpoint's; None if unknown."""
    try:
        run_id = json.loads((run_dir / RUN_FILE).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        found = list_checkpoints(run_dir)
        run_id = checkpoint_run_id(found[-1]) if found else None
    return run_id if isinstance(run_id, str) else None


def run_id_for(out: Any, resume_from: dict[str, Any] | None) -> str:
    """The id this run will have in folder ``out``; refuses (RunFolderError) a folder holding another run.

    ``resume_from``: the loaded checkpoint when resuming (its ``run_id`` continues), else None (fresh run).
    Reads only: call ``claim`` to take the folder.
    """
    run_dir = check_out(out)
    existing = folder_run_id(run_dir) if run_dir.is_dir() else None
    if resume_from is None:
        if run_dir.is_dir() and (list_checkpoints(run_dir) or (run_dir / "summary.json").exists()):
            held = f" (run {existing})" if existing else ""
            raise RunFolderError(f"--out {run_dir} already holds a run{held}: continue it with --resume {run_dir}, "
                                 "or choose another --out")
        return new_run_id()
    resumed = resume_from.get("run_id")
    if existing and resumed and existing != resumed:
        raise RunFolderError(f"checkpoint {resume_from.get('path')} belongs to run {resumed}, but --out {run_dir} "
                             f"holds run {existing}: resume into the checkpoint's own folder or an empty --out")
    return resumed or existing or new_run_id()  # checkpoints written before run ids had none


def move_aside(run_dir: Path) -> Path | None:
    """Move the files of another run that left no checkpoint into ``aborted-<its id>/``; returns that folder."""
    found = [run_dir / name for name in (*RUN_FILES, "tensorboard") if (run_dir / name).exists()]
    if not found:
        return None
    aside = run_dir / f"aborted-{folder_run_id(run_dir) or new_run_id()}"
    aside.mkdir(exist_ok=True)
    for path in found:
        os.replace(path, aside / path.name)
    return aside


def claim(out: Any, run_id: str) -> str | None:
    """Make ``out`` the folder of run ``run_id`` (run.json): remove stale temp files, move aside the files of
    another run that left no checkpoint; returns a one-line note when it moved some. Only one process (rank 0)
    calls it, after ``run_id_for`` accepted the folder."""
    run_dir = check_out(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(run_dir)
    note = None
    if holds_a_run(run_dir) and not list_checkpoints(run_dir) and folder_run_id(run_dir) != run_id:
        aside = move_aside(run_dir)
        note = f"note: {run_dir} held a run that left no checkpoint; its files were moved to {aside}"
    if folder_run_id(run_dir) != run_id:
        write_atomically(run_dir / RUN_FILE, json.dumps({"run_id": run_id}) + "\n")
    return note


def finished_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's summary.json when the run has finished (the file exists and is a JSON object)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def _json_lines(path: Path) -> tuple[list[tuple[str, dict[str, Any]]], str | None]:
    """(line, record) pairs of a JSON-lines file and a note when its last line was torn (a kill mid-write:
    the line is dropped). Any other line that is not a JSON object raises RunFolderError naming the file and
    the line."""
    lines = path.read_text().split("\n")
    pairs, note = [], None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            record, error = None, str(exc)
        else:
            error = None if isinstance(record, dict) else "not a JSON object"
        if error is None:
            pairs.append((line, record))
        elif i == len(lines) - 1:  # no newline after it: the write was cut short
            note = (f"{path}: dropped a torn last line ({len(line)} characters; the previous process was killed "
                    "while writing it)")
        else:
            raise RunFolderError(f"{path} line {i + 1} is not a JSON record ({error}); fix or delete that line")
    return pairs, note


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], str | None]:
    """The records of a JSON-lines file and the torn-last-line note (see ``_json_lines``)."""
    pairs, note = _json_lines(path)
    return [record for _, record in pairs], note


def trim_jsonl(path: Path, step: int) -> str | None:
    """Keep the records of steps <= ``step`` (a resumed run writes the later ones again), rewriting the file
    atomically with the kept lines as they were; returns the torn-line note, if any."""
    if not path.exists():
        return None
    pairs, note = _json_lines(path)
    write_atomically(path, "".join(line + "\n" for line, record in pairs if record.get("step", 0) <= step))
    return note


def last_record(path: Path, step: int) -> dict[str, Any]:
    """The record of ``step`` in a JSON-lines file ({} if there is none): what a run killed after its last
    checkpoint had logged for that step (loss, validation metrics) when its summary is written on resume."""
    if not path.exists():
        return {}
    found = [record for record in read_jsonl(path)[0] if record.get("step") == step]
    return found[-1] if found else {}


def resume_notes(saved: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """One-line warnings for a resume that will be correct but not bit-identical to an uninterrupted run:
    another thread count or world size changes the order of floating-point sums (``saved`` and ``current``:
    ``{"threads": ..., "world_size": ...}``; checkpoints written before this was stored have none)."""
    notes = []
    for key, what in (("threads", "threads"), ("world_size", "processes")):
        before, now = (saved or {}).get(key), current.get(key)
        if before is not None and now is not None and before != now:
            notes.append(f"warning: resuming with {now} {what}, the checkpoint was written with {before}: the run "
                         "continues correctly but not bit-identically to an uninterrupted one (summation order)")
    return notes
