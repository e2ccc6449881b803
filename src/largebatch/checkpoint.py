"""One file per checkpoint, written atomically, verified and loaded without executing code.

Files are ``ckpt-<step>.pt`` in the run folder: a new checkpoint never overwrites an existing file
(temp file in the same folder + flush + fsync + rename + fsync of the folder), and older ones are deleted
only after the new one is complete, keeping the newest ``keep`` of *this run's* checkpoints (the run id in
the payload; files of another run or that cannot be read are never deleted).

Integrity: a checkpoint is torch's zip archive, whose format stores a CRC-32 of every record (torch writes
them; saving forces that on). torch does not check them when reading, so ``load_checkpoint`` first reads
every record through :mod:`zipfile`, which does: one flipped byte anywhere in a tensor or in the pickled
structure is refused, naming the file. Loading then uses ``torch.load(weights_only=True)``: the file holds
tensors and plain containers only (RNG states included), so it cannot run code. A training state must hold
``step``, ``model``, ``optimizer`` and ``rng``, with finite model and optimizer tensors.
"""
from __future__ import annotations

import contextlib
import functools
import os
import random
import re
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterator

import torch

_NAME = re.compile(r"^ckpt-(\d+)\.pt$")
#: what every training checkpoint holds (``load_checkpoint`` names the first one missing)
TRAINING_KEYS = ("step", "model", "optimizer", "rng")
#: the temp files of interrupted writes (``save_checkpoint`` and ``write_atomically``)
TEMP_PATTERNS = (".ckpt-*.tmp", ".*.json*.tmp")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or cannot be written; the message names the file."""


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    version, internal, gauss = random.getstate()
    state["python"] = [version, list(internal), gauss]
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached]
    except ImportError:  # numpy is optional for the optimizers
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"ckpt-{step:08d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def check_keep(keep: Any) -> int:
    """``keep_checkpoints``: how many of the run's newest checkpoints stay on disk (an integer >= 1)."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"Invalid keep_checkpoints: {keep!r} (allowed: an integer >= 1, the number of newest "
                         "checkpoints kept)")
    return keep


def remove_stale_temps(run_dir: str | Path) -> list[Path]:
    """Delete the temp files a killed write left behind (call when no other process writes the folder)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    stale = sorted({p for pattern in TEMP_PATTERNS for p in run_dir.glob(pattern) if p.is_file()})
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


class _RecordingFile:
    """A file whose first OSError is kept: torch.save reports a failed write as a RuntimeError without the
    reason (e.g. 'unexpected pos'), and the reason (no space left) is what a user needs."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.f.flush()


@contextlib.contextmanager
def _crc32_on() -> Iterator[None]:
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(True)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(previous)


def _fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself is durable
    finally:
        os.close(dir_fd)


def _write_failure(target: Path, exc: BaseException) -> str:
    reason = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else str(exc).splitlines()[0][:200]
    try:
        free = f"{shutil.disk_usage(target.parent).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    older = list_checkpoints(target.parent)
    kept = f"the last good checkpoint {older[-1]} is kept" if older else "no earlier checkpoint exists"
    return f"cannot write checkpoint {target}: {reason} ({free} on the disk of {target.parent}); {kept}"


@functools.cache
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def replaced_atomically(target: Path, prefix: str | None = None) -> Iterator[Path]:
    """A fresh temp path beside ``target`` to write to (``<prefix>XXXX.tmp``, by default ``.<name>-XXXX.tmp``);
    renamed over ``target`` when the block ends without error, removed otherwise. Writers of the same file at
    once each write their own temp file, and a reader sees the old file or a whole new one, never a part."""
    fd, tmp = tempfile.mkstemp(prefix=prefix or f".{target.name}-", suffix=".tmp", dir=target.parent)
    try:
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # what open() would give (mkstemp's is 0600): caches are shared
        finally:
            os.close(fd)
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_file(target: Path, write, prefix: str) -> None:
    """``write(file)`` into a temp file beside ``target``, fsync it, rename it over ``target``, fsync the
    folder. On failure the temp file is removed and ``target`` is as it was; an OSError (disk full,
    read-only folder) becomes a CheckpointError naming the path and the disk."""
    recorder = None
    try:
        with replaced_atomically(target, prefix) as tmp, tmp.open("wb") as f:
            recorder = _RecordingFile(f)
            write(recorder)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as exc:
        error = recorder.error if recorder is not None and recorder.error is not None else exc
        if isinstance(error, OSError):
            raise CheckpointError(_write_failure(target, error)) from None
        raise
    _fsync_dir(target.parent)


def write_atomically(path: str | Path, text: str) -> None:
    """Replace ``path`` by ``text`` so that a reader (or a kill -9) sees the old file or the new one, never a
    mix (run.json, summary.json, the metrics trim on resume)."""
    path = Path(path)
    _write_file(path, lambda f: f.write(text.encode()), prefix=f".{path.name}.")


def checkpoint_entry(path: str | Path, key: str) -> str | None:
    """A string entry of a checkpoint (``run_id``, ``input_fingerprint``), reading only its pickled structure
    (tensors are memory-mapped, not read); None when the file cannot be read or holds no such string."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any unreadable file is simply not known to hold it
        return None
    value = payload.get(key) if isinstance(payload, dict) else None
    return value if isinstance(value, str) else None


def checkpoint_run_id(path: str | Path) -> str | None:
    """The run id stored in a checkpoint; None when the file cannot be read or holds no id."""
    return checkpoint_entry(path, "run_id")


def prune_checkpoints(run_dir: str | Path, keep: int, run_id: str | None) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints of run ``run_id`` (None: those without an id)."""
    ours = [p for p in list_checkpoints(run_dir) if checkpoint_run_id(p) == run_id]
    for old in ours[:-check_keep(keep)]:
        old.unlink(missing_ok=True)
    return ours[:-keep]


def save_checkpoint(payload: dict[str, Any], run_dir: str | Path, step: int, keep: int = 2) -> Path:
    """Write ``payload`` atomically as ``ckpt-<step>.pt``; then drop all but the newest ``keep`` checkpoints
    of the same run (``payload["run_id"]``). A failed write (disk full) raises a CheckpointError naming the
    path and the disk, and leaves the earlier checkpoints untouched."""
    check_keep(keep)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = checkpoint_path(run_dir, step)
    with _crc32_on():
        _write_file(target, lambda f: torch.save(payload, f), prefix=".ckpt-")
    prune_checkpoints(run_dir, keep, payload.get("run_id"))
    return target


def _verify_records(path: Path, hint: str) -> None:
    """Check the CRC-32 of every record of the archive (torch.load does not)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: "
                              f"{str(exc)[:200]}){hint}") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} fails its checksum (CRC-32 of record {bad}): the file is "
                              f"damaged{hint}")


def _nonfinite_tensor(tree: Any, prefix: str) -> str | None:
    """The name of the first floating-point tensor in ``tree`` holding a NaN or an infinity."""
    if isinstance(tree, torch.Tensor):
        bad = tree.is_floating_point() and not bool(torch.isfinite(tree).all())
        return prefix if bad else None
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    for key, value in items:
        if (name := _nonfinite_tensor(value, f"{prefix}.{key}" if prefix else str(key))) is not None:
            return name
    return None


def _check_training_state(payload: Any, path: Path, required: tuple[str, ...], hint: str) -> None:
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a largebatch training state")
    missing = [k for k in required if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(repr(k) for k in missing)} (a largebatch "
                              f"training state holds {', '.join(required)}){hint}")
    for key in ("model", "optimizer"):
        if key in payload and (name := _nonfinite_tensor(payload[key], key)) is not None:
            raise CheckpointError(f"checkpoint {path}: {name} holds NaN or infinite values; refusing to resume "
                                  f"from it{hint}")
    step = payload.get("step")
    if "step" in required and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise CheckpointError(f"checkpoint {path}: step is {step!r} (expected an integer >= 0)")


def _older_hint(path: Path) -> str:
    older = [p.name for p in list_checkpoints(path.parent) if p != path]
    return f"; other checkpoints in that folder: {', '.join(older)}" if older else ""


def load_checkpoint(path: str | Path, required: tuple[str, ...] = TRAINING_KEYS) -> dict[str, Any]:
    """Load a checkpoint file (or the newest in a run folder) safely and verified; a CheckpointError naming
    the file if it is missing, damaged, lacks one of ``required`` or holds non-finite model/optimizer values."""
    path = Path(path)
    if path.is_dir():
        found = list_checkpoints(path)
        if not found:
            raise CheckpointError(f"no checkpoint (ckpt-*.pt) in {path}")
        path = found[-1]
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    hint = _older_hint(path)
    _verify_records(path, hint)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for a damaged or unsafe file
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else ''}){hint}") from None
    _check_training_state(payload, path, required, hint)
    payload["path"] = str(path)
    return payload
