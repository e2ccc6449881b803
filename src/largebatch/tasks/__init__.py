"""Tasks: real data + a model from a well-kept library + a metric, behind one small interface.

The interface (what the trainer may use) is written once, in :class:`largebatch.tasks.base.Task`.
"""
from __future__ import annotations

from .base import DataMissingError, Task

TASKS = ("mlm", "classify", "image")


def build_task(name: str, **options) -> Task:
    """Build a task by name; options are the task's config fields (see each module's ``*Config``)."""
    if name == "mlm":
        from .mlm import MLMTask
        return MLMTask(**options)
    if name == "classify":
        from .classify import ClassifyTask
        return ClassifyTask(**options)
    if name == "image":
        from .image import ImageTask
        return ImageTask(**options)
    raise ValueError(f"Invalid task: {name!r} (allowed: {' | '.join(TASKS)})")


__all__ = ["Task", "DataMissingError", "build_task", "TASKS"]
