"""A task's options as its config dataclass, with a one-line error naming an option the task does not take."""
from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

C = TypeVar("C")


def task_config(cls: type[C], options: dict[str, Any], task: str) -> C:
    """``cls(**options)``; an unknown option (e.g. ``label_field`` given to ``mlm``) is a ValueError."""
    allowed = [f.name for f in dataclasses.fields(cls) if f.name != "extra"]
    unknown = [k for k in options if k not in allowed]
    if unknown:
        raise ValueError(f"Invalid option {unknown[0]!r} for task {task!r} (allowed: {', '.join(allowed)})")
    return cls(**options)
