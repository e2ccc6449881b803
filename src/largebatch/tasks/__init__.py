"""Tasks: real data + a model from a well-kept library + a metric, behind one small interface.

The interface (what the trainer may use) is written once, in :class:`largebatch.tasks.base.Task`.
Each task module holds a ``*Config`` dataclass of its options and the task class; :data:`TASK_CLASSES`
names them, so options can be checked (:func:`check_task_options`) before any data is read.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from .base import DataMissingError, Task

#: task name -> (module, task class, options dataclass)
TASK_CLASSES = {
    "mlm": ("mlm", "MLMTask", "MLMConfig"),
    "classify": ("classify", "ClassifyTask", "ClassifyConfig"),
    "image": ("image", "ImageTask", "ImageConfig"),
}
TASKS = tuple(TASK_CLASSES)


def _task_attr(name: str, index: int):
    if name not in TASK_CLASSES:
        raise ValueError(f"Invalid task: {name!r} (allowed: {' | '.join(TASKS)})")
    module = importlib.import_module(f"{__name__}.{TASK_CLASSES[name][0]}")
    return getattr(module, TASK_CLASSES[name][index])


def build_task(name: str, **options) -> Task:
    """Build a task by name; options are the task's config fields (see each module's ``*Config``)."""
    return _task_attr(name, 1)(**options)


def check_task_options(name: str, options: dict[str, Any]) -> None:
    """Check a task's options against its ``*Config`` dataclass (names, types and the dataclass's own checks)
    without reading any data; a ValueError of one line names the first bad option."""
    from pydantic import TypeAdapter, ValidationError

    config_class = _task_attr(name, 2)
    known = [f.name for f in dataclasses.fields(config_class)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"Invalid option {unknown[0]!r} for task {name!r} (allowed: {', '.join(known)})")
    try:
        TypeAdapter(config_class).validate_python(options)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "value_error":
            raise ValueError(f"{err['ctx']['error']}") from None
        raise ValueError(f"Invalid task option {loc}: {err['input']!r} ({err['msg']})") from None


__all__ = ["Task", "DataMissingError", "build_task", "check_task_options", "TASKS"]
