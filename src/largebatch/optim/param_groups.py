"""Parameter groups with SEPARATE exclusion rules for weight decay and for the trust ratio.

The TensorFlow reference of LAMB excludes LayerNorm and bias from both; NVIDIA excludes them from
decay and (through ``trust_ratio="decayed"``) from the ratio; the authors' ResNet code decays biases
but not BatchNorm. One helper expresses all of them.
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

Predicate = Callable[[str, Tensor, nn.Module], bool]

NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)
if hasattr(nn, "RMSNorm"):
    NORM_LAYERS = NORM_LAYERS + (nn.RMSNorm,)


def is_bias(name: str, param: Tensor, module: nn.Module) -> bool:
    return name.rsplit(".", 1)[-1] == "bias"


def is_norm(name: str, param: Tensor, module: nn.Module) -> bool:
    """Parameter of a normalisation layer (LayerNorm, BatchNorm, GroupNorm, ...)."""
    return isinstance(module, NORM_LAYERS) or "layernorm" in name.lower().replace("_", "")


def is_1d(name: str, param: Tensor, module: nn.Module) -> bool:
    return param.ndim <= 1


def bias_or_norm(name: str, param: Tensor, module: nn.Module) -> bool:
    """The usual 'no weight decay' rule: biases, normalisation parameters and any 0-/1-D tensor."""
    return is_bias(name, param, module) or is_norm(name, param, module) or is_1d(name, param, module)


def _matcher(patterns: Iterable[str] | str | None, predicate: Predicate | None) -> Predicate:
    """Name patterns (fnmatch globs, or regexes prefixed with 're:') OR a predicate."""
    if isinstance(patterns, str):
        patterns = (patterns,)
    compiled = []  # (regex, search?) — globs must match the whole name, 're:' regexes anywhere
    for pat in patterns or ():
        if not isinstance(pat, str):
            raise TypeError(f"Invalid name pattern: {pat!r} (allowed: str globs or 're:<regex>')")
        if pat.startswith("re:"):
            compiled.append((re.compile(pat[3:]), True))
        else:
            compiled.append((re.compile(fnmatch.translate(pat)), False))

    def match(name: str, param: Tensor, module: nn.Module) -> bool:
        if any(rx.search(name) if search else rx.match(name) for rx, search in compiled):
            return True
        return bool(predicate(name, param, module)) if predicate is not None else False

    return match


def _declared_no_weight_decay(model: nn.Module) -> list[str]:
    """Names the model itself declares decay-free through ``model.no_weight_decay()`` (timm), else []."""
    declared = getattr(model, "no_weight_decay", None)
    if not callable(declared):
        return []
    names = declared()
    if isinstance(names, str) or not isinstance(names, Iterable):
        raise TypeError(f"Invalid model.no_weight_decay(): {names!r} (allowed: a set or list of parameter names)")
    return sorted(names)


def param_groups(
    model: nn.Module,
    weight_decay: float = 0.01,
    *,
    no_weight_decay: Iterable[str] | str | None = None,
    no_weight_decay_if: Predicate | None = bias_or_norm,
    no_trust_ratio: Iterable[str] | str | None = None,
    no_trust_ratio_if: Predicate | None = None,
    model_no_weight_decay: bool = True,
    verbose: bool = False,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Split a model's trainable parameters into up to four groups: (decay on/off) × (trust ratio on/off).

    Args:
        weight_decay: λ of the decayed groups (the others get 0).
        no_weight_decay / no_trust_ratio: parameter-name patterns (``"*.bias"``, ``"*LayerNorm*"``, or
            ``"re:<regex>"``) excluded from decay / from the trust ratio.
        no_weight_decay_if / no_trust_ratio_if: predicates ``f(name, param, module) -> bool``; by default
            biases, normalisation parameters and 1-D tensors get no decay, and every tensor gets a ratio
            (the paper). Pass ``None`` to disable a default.
        model_no_weight_decay: also exclude from decay the names (or fnmatch patterns) returned by the
            model's own ``no_weight_decay()`` when it defines one (timm's convention: a ViT's ``pos_embed``
            and ``cls_token``), as timm's ``create_optimizer`` does.
        verbose: print the groups' counts.
        group_options: extra keys for every group (e.g. ``lr_scale``).

    Returns a list of param-group dicts with keys ``params``, ``param_names``, ``weight_decay``,
    ``trust_ratio=False`` for excluded groups (+ group_options). Each group carries ``group_name``, ``num_tensors``, ``num_params``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model: {type(model).__name__} (allowed: a torch.nn.Module)")
    if isinstance(no_weight_decay, str):
        no_weight_decay = (no_weight_decay,)
    if not isinstance(model_no_weight_decay, bool):
        raise TypeError(f"Invalid model_no_weight_decay: {model_no_weight_decay!r} (allowed: True | False)")
    declared = _declared_no_weight_decay(model) if model_no_weight_decay else []
    skip_decay = _matcher([*(no_weight_decay or ()), *declared], no_weight_decay_if)
    skip_ratio = _matcher(no_trust_ratio, no_trust_ratio_if)
    owners = {}
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            owners[f"{mod_name}.{p_name}" if mod_name else p_name] = module
    buckets: dict[tuple[bool, bool], dict[str, Any]] = {}
    for full_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        module = owners.get(full_name, model)
        name = full_name.replace("_orig_mod.", "")  # torch.compile's wrapper: report the model's own names
        decay = not skip_decay(name, param, module)
        ratio = not skip_ratio(name, param, module)
        bucket = buckets.setdefault((decay, ratio), {"params": [], "param_names": []})
        bucket["params"].append(param)
        bucket["param_names"].append(name)
    groups = []
    for (decay, ratio), b in sorted(buckets.items(), reverse=True):
        groups.append({
            **b,
            "weight_decay": weight_decay if decay else 0.0,
            # only exclusions are written: an included group keeps the optimizer's own trust_ratio mode
            # (True, or "decayed" for the NVIDIA/timm presets)
            **({} if ratio else {"trust_ratio": False}),
            "group_name": f"{'decay' if decay else 'no_decay'}/{'trust_ratio' if ratio else 'no_trust_ratio'}",
            "num_tensors": len(b["params"]),
            "num_params": sum(p.numel() for p in b["params"]),
            **group_options,
        })
    if verbose:
        print(describe_groups(groups))
    return groups


def align_param_names(groups: list[dict[str, Any]], new_group: dict[str, Any]) -> dict[str, Any]:
    """``new_group`` made acceptable to ``torch.optim.Optimizer.add_param_group`` beside ``groups``.

    torch refuses to mix groups with and without ``param_names``, and :func:`param_groups` names its
    groups, so a later group added by a library that passes bare tensors (Lightning's ``BaseFinetuning``)
    would fail inside torch. Whichever side has no names gets placeholders ``"group{i}.{j}"`` (the names
    the optimizers' telemetry gives unnamed groups); ``groups`` are completed in place, the new group is
    returned as a new dict. Anything torch would reject for another reason is returned unchanged.
    """
    params = new_group.get("params") if isinstance(new_group, dict) else None
    if not groups or params is None or isinstance(params, (set, str)):
        return new_group
    params = [params] if isinstance(params, Tensor) else list(params)
    new_group = {**new_group, "params": params}
    named = "param_names" in new_group or any(isinstance(p, tuple) for p in params)
    if named and not all(isinstance(p, tuple) for p in params) and "param_names" not in new_group:
        return new_group  # a mix of named and bare tensors: torch's own error says what is wrong
    if not named and any("param_names" in g for g in groups):
        new_group["param_names"] = [f"group{len(groups)}.{j}" for j in range(len(params))]
    elif named:
        for i, g in enumerate(groups):
            g.setdefault("param_names", [f"group{i}.{j}" for j in range(len(g["params"]))])
    return new_group


def describe_groups(groups: list[dict[str, Any]]) -> str:
    lines = [f"{'group':<32}{'tensors':>9}{'params':>14}{'weight_decay':>14}"]
    for g in groups:
        lines.append(f"{g.get('group_name', '?'):<32}{len(g['params']):>9}"
                     f"{sum(p.numel() for p in g['params']):>14,}{g['weight_decay']:>14g}")
    return "\n".join(lines)
