"""Validation of a state_dict before :meth:`TrustRatioOptimizer.load_state_dict` loads any of it.

Everything that would make the load fail half-way, or load nonsense silently, is refused here with a
ValueError (or TypeError for a wrong type) naming what is wrong: another optimizer's state, ids that
belong to no parameter, tensors of the wrong shape, a ``master_param`` where there is no low-precision
parameter, non-finite moments, an invalid hyper-parameter.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

LOW_PRECISION = (torch.bfloat16, torch.float16)


def _bad(message: str) -> ValueError:
    return ValueError(f"Invalid state_dict: {message}")


def check_layout(state_dict: Any, n_groups: int, n_params: int) -> tuple[list[dict], list[Any], dict]:
    """The two top-level entries, their types, and the group/parameter counts; (groups, ids, state)."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"Invalid state_dict: {type(state_dict).__name__} (allowed: a dict from state_dict())")
    groups, state = state_dict.get("param_groups"), state_dict.get("state")
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise TypeError("Invalid state_dict: 'param_groups' must be a list of dicts")
    if not isinstance(state, dict):
        raise TypeError("Invalid state_dict: 'state' must be a dict")
    for g in groups:
        if not isinstance(g.get("params"), list):
            raise TypeError("Invalid state_dict: every param group needs a 'params' list of ids")
    ids = [i for g in groups for i in g["params"]]
    if len(ids) != n_params or len(groups) != n_groups:
        raise _bad(f"it holds {len(ids)} parameters in {len(groups)} groups, this optimizer has {n_params} in "
                   f"{n_groups} (a different model?)")
    if len(set(map(repr, ids))) != len(ids):
        raise _bad("a parameter id appears twice in 'param_groups'")
    unknown = [k for k in state if k not in ids]
    if unknown:
        raise _bad(f"state for ids {unknown[:5]!r} that no param group holds")
    return groups, ids, state


def filled_groups(saved: list[dict], current: list[dict], defaults: dict, signature: Sequence[str],
                  kind: str, validate: Callable[[dict], None]) -> list[dict]:
    """The groups the load would produce, each validated; keys a newer version added take the
    constructor's value. A group without this optimizer's ``signature`` keys is another optimizer's."""
    out = []
    for g, cur in zip(saved, current):
        missing = [k for k in signature if k not in g]
        if missing:
            raise _bad(f"param_groups lack {missing} (not a {kind} state_dict; "
                       f"it has {sorted(k for k in g if k != 'params')})")
        group = {**defaults, **g, "params": cur["params"]}
        validate(group)
        out.append(group)
    return out


def _check_step(where: str, step: Any) -> None:
    value = step
    if isinstance(step, Tensor):
        if step.numel() != 1 or step.is_complex():
            raise _bad(f"{where}['step'] must be a number, got a tensor of shape {tuple(step.shape)}")
        value = step.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Invalid state_dict: {where}['step'] must be a number, got {type(step).__name__}")
    if not (math.isfinite(value) and value >= 0):
        raise _bad(f"{where}['step'] = {value!r} (allowed: a finite number >= 0)")


def _check_tensor(where: str, key: str, t: Any, shape: tuple[int, ...]) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"Invalid state_dict: {where}[{key!r}] must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"Invalid state_dict: {where}[{key!r}] has dtype {t.dtype} (allowed: a floating dtype)")
    if tuple(t.shape) != shape:
        raise _bad(f"{where}[{key!r}] has shape {tuple(t.shape)}, the parameter has shape {shape} "
                   "(a different model?)")
    if not bool(torch.isfinite(t).all()):
        raise _bad(f"{where}[{key!r}] holds NaN or inf")


def check_param_state(saved_id: Any, s: Any, p: Tensor, group: dict, tensor_keys: Sequence[str], kind: str) -> None:
    """One parameter's saved state: this optimizer's keys, all of them, finite, the parameter's shape;
    ``master_param`` only for a bf16/fp16 parameter whose group keeps master weights, and float32."""
    where = f"state[{saved_id!r}]"
    if not isinstance(s, dict):
        raise TypeError(f"Invalid state_dict: {where} must be a dict, got {type(s).__name__}")
    if not s:
        return
    allowed = {"step", "master_param", *tensor_keys}
    foreign = sorted(map(str, set(s) - allowed))
    if foreign:
        raise _bad(f"{where} has keys {foreign} that a {kind} does not use (another optimizer's state_dict?)")
    missing = [k for k in ("step", *tensor_keys) if k not in s]
    if missing:
        raise _bad(f"{where} lacks {missing}")
    _check_step(where, s["step"])
    for key in tensor_keys:
        _check_tensor(where, key, s[key], tuple(p.shape))
    if "master_param" in s:
        if p.dtype not in LOW_PRECISION or not group["master_weights"]:
            raise _bad(f"{where} has a 'master_param' but the parameter is {p.dtype} with master_weights="
                       f"{group['master_weights']} (it would overwrite the weights)")
        _check_tensor(where, "master_param", s["master_param"], tuple(p.shape))
        if s["master_param"].dtype != torch.float32:
            raise TypeError(f"Invalid state_dict: {where}['master_param'] has dtype {s['master_param'].dtype} "
                            "(allowed: torch.float32)")
