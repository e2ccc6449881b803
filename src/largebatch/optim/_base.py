"""What LAMB and LARS share: validation, tensor collection, global gradient pre-normalisation,
sharded norm reduction, implementation choice and per-tensor telemetry."""
from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from . import kernel, state_checks
from .param_groups import align_param_names
from .trust_ratio import PHI_CHOICES, TRUST_RATIO_CHOICES, norm_dtype, trust_mask

#: what step() does when a gradient holds NaN or ±inf (docs/algorithms.md, "Non-finite gradients")
NONFINITE_CHOICES = ("skip", "raise", "propagate")
#: ``sync_free``: the step's counters, coefficients and skip decision stay on the device (no host read);
#: None: on when the gradients are on an accelerator (not the CPU) and no group sets foreach=False
SYNC_FREE_CHOICES = (None, True, False)
#: the foreach (multi-tensor, GPU) paths hold about two temporaries the size of the tensors they update
#: (LAMB: u and its denominator); they run over buckets of tensors of at most this many elements in all
#: (or one tensor, if larger), so a 1 B-parameter model needs 2 × 256 MiB of fp32 temporaries, not 8 GB.
#: Ratios are per tensor, so the buckets change nothing in the result (tested).
FOREACH_BUCKET_ELEMENTS = 1 << 26
_LOW_PRECISION = (torch.bfloat16, torch.float16)
#: why step() runs eagerly under torch.compile (a graph break; with fullgraph=True, this error)
COMPILE_REASON = ("largebatch's Lamb/Lars step() runs eagerly, outside torch.compile: it calls a C kernel "
                  "through ctypes and keeps host-side caches per step. Compile the model (or the forward and "
                  "backward) and call optimizer.step() outside the compiled function, or without fullgraph=True")


def invalid(name: str, value: Any, allowed: str) -> ValueError:
    """The one validation message template: names the argument, the value and what is allowed."""
    return ValueError(f"Invalid {name}: {value!r} (allowed: {allowed})")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    # `True == 1` in Python: compare types too so that trust_ratio=1 is rejected, not silently True.
    if not any(value is c or (type(value) is type(c) and value == c) for c in choices):
        raise invalid(name, value, " | ".join(repr(c) for c in choices))


def check_number(name: str, value: Any, *, low: float = 0.0, high: float | None = None,
                 low_inclusive: bool = True, high_inclusive: bool = False) -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise invalid(name, value, "a number or a 1-element tensor")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Invalid {name}: {value!r} (allowed: a real number)")
    ok_low = value >= low if low_inclusive else value > low
    ok_high = value < math.inf if high is None else (value <= high if high_inclusive else value < high)
    if not (ok_low and ok_high) or value != value:
        lo = "[" if low_inclusive else "("
        hi = "inf)" if high is None else (f"{high}]" if high_inclusive else f"{high})")
        raise invalid(name, value, f"a number in {lo}{low}, {hi}")


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def local_tensor(t: Tensor) -> Tensor:
    """The shard this rank holds (FSDP2 parameters are DTensors); plain tensors pass through."""
    if type(t) in _PLAIN:  # the common case, without a failing attribute lookup (it runs per tensor per step)
        return t
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def sharded_group(t: Tensor):
    """Process group over which a DTensor is sharded, or None for plain / replicated tensors."""
    placements = getattr(t, "placements", None)
    if placements is None:
        return None
    if not any(p.is_shard() for p in placements):
        return None
    return t.device_mesh.get_group()  # type: ignore[attr-defined]  # a DTensor (it has placements)


def check_subset_step(defaults: dict[str, Any]) -> None:
    """Options under which updating some tensors before the others' gradients exist cannot be exact."""
    if defaults.get("max_grad_norm") is not None:
        raise invalid("max_grad_norm", defaults["max_grad_norm"],
                      "None when stepping a subset of the parameters (the NVLAMB pre-normalisation divides "
                      "every gradient by the norm of ALL gradients)")
    if defaults.get("nonfinite") == "skip":
        raise invalid("nonfinite", "skip", "'raise' | 'propagate' when stepping a subset of the parameters (a "
                      "skipped step leaves every tensor unchanged, which needs all gradients first)")


class TrustRatioOptimizer(Optimizer):
    """Base class of :class:`Lamb` and :class:`Lars`.

    Subclasses implement ``_step_group`` for their maths; this class owns everything around it.
    """

    #: per-parameter state tensors besides ``step`` and ``master_param`` (checked on ``load_state_dict``)
    _moment_keys: tuple[str, ...] = ()
    #: param-group keys only this optimizer has: a saved group without them is another optimizer's
    _signature_keys: tuple[str, ...] = ()

    def __init__(self, params: ParamsT, defaults: dict[str, Any]):
        self._init_caches()
        super().__init__(params, defaults)

    def _init_caches(self) -> None:
        """What the optimizer keeps outside its state: rebuilt after pickling/deepcopy, which keep only
        torch.optim's defaults, state and param_groups."""
        self._telemetry: dict[int, tuple[list[str], Tensor]] = {}
        self._partial_telemetry: dict[int, dict[str, Tensor]] = {}  # rows of step_params(), by name
        self._warned: set[str] = set()
        self._scratch_buffers: dict[torch.dtype, Tensor] = {}
        self._step_buffers: dict[int, Tensor] = {}  # see _advance_steps
        self._last_skipped = False  # the last step() met a non-finite gradient and updated nothing
        self._last_ok: Tensor | None = None  # ... or, sync-free, the device flag saying it stepped
        self._skipped_on_device: Tensor | None = None  # sync-free skips not yet folded into param_groups

    def __getstate__(self) -> dict[str, Any]:
        # pickling/deepcopy keep only torch.optim's three entries: fold the device count into the groups
        return {**super().__getstate__(), "param_groups": self._groups_with_skips()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._init_caches()

    # ------------------------------------------------------------------ validation
    def _validate_common(self, group: dict[str, Any]) -> None:
        check_number("lr", group["lr"])
        check_number("weight_decay", group["weight_decay"])
        check_choice("trust_ratio", group["trust_ratio"], TRUST_RATIO_CHOICES)
        check_choice("phi", group["phi"], PHI_CHOICES)
        for bound in ("phi_min", "phi_max"):
            if group[bound] is not None:
                check_number(bound, group[bound])
        if group["phi"] in ("clamp_norm", "clamp_ratio"):
            if group["phi_min"] is None and group["phi_max"] is None:
                raise invalid("phi_min/phi_max", (None, None),
                              f"at least one bound when phi={group['phi']!r} (the paper gives no default)")
        elif group["phi_min"] is not None or group["phi_max"] is not None:
            raise invalid("phi_min/phi_max", (group["phi_min"], group["phi_max"]),
                          "None unless phi is 'clamp_norm' or 'clamp_ratio'")
        if group["phi_min"] is not None and group["phi_max"] is not None and group["phi_min"] > group["phi_max"]:
            raise invalid("phi_min", group["phi_min"], f"<= phi_max ({group['phi_max']})")
        for flag in ("foreach", "fused"):
            check_choice(flag, group[flag], (None, True, False))
        if group["foreach"] and group["fused"]:
            raise invalid("foreach/fused", (True, True), "at most one of them True")
        check_choice("master_weights", group["master_weights"], (True, False))
        check_choice("nonfinite", group["nonfinite"], NONFINITE_CHOICES)
        if group["nonfinite"] != self.defaults["nonfinite"]:
            raise invalid("nonfinite", group["nonfinite"],
                          f"only the optimizer-wide value {self.defaults['nonfinite']!r} in every param group "
                          "(a skipped step skips every group)")
        check_choice("sync_free", group["sync_free"], SYNC_FREE_CHOICES)
        if group["sync_free"] != self.defaults["sync_free"]:
            raise invalid("sync_free", group["sync_free"],
                          f"only the optimizer-wide value {self.defaults['sync_free']!r} in every param group "
                          "(one skip decision for every group)")
        if group["sync_free"] and (group["fused"] or group["foreach"] is False):
            raise invalid("sync_free", True, "None or False with fused=True or foreach=False (the sync-free step "
                          "is the multi-tensor path's; the C kernel and the single-tensor loop read on the host)")
        if group["max_grad_norm"] != self.defaults["max_grad_norm"]:
            # NVLAMB pre-normalisation divides by ONE norm over all groups: a per-group value cannot be honoured
            raise invalid("max_grad_norm", group["max_grad_norm"],
                          f"only the optimizer-wide value {self.defaults['max_grad_norm']!r} in every param group "
                          "(the pre-normalisation uses one global norm over all groups)")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # groups from param_groups() carry names; one added later without them must still be accepted
        super().add_param_group(align_param_names(self.param_groups, param_group))
        group = self.param_groups[-1]
        self._validate_group(group)
        for p in group["params"]:
            if p.is_sparse:
                raise TypeError(f"{type(self).__name__} does not support sparse parameters")
            if p.is_complex():  # the trust ratio and v = E[g²] are defined for real tensors only
                raise TypeError(f"{type(self).__name__} does not support complex parameters (got {p.dtype}); "
                                "optimise torch.view_as_real(p) instead")

    def _validate_group(self, group: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ state
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Stock format. Everything is checked first (:mod:`largebatch.optim.state_checks`), then loaded
        all or nothing: a ValueError/TypeError names what is wrong and leaves the optimizer as it was.
        ``sync_free`` keeps this optimizer's value (a checkpoint written on a GPU loads on a CPU and back)."""
        kind = type(self).__name__
        params = [p for g in self.param_groups for p in g["params"]]
        saved_groups, saved_ids, saved_state = state_checks.check_layout(state_dict, len(self.param_groups),
                                                                         len(params))
        # sync_free describes the machine, not the run: this optimizer's value, whatever the writer's was
        saved_groups = [{**g, "sync_free": self.defaults["sync_free"]} for g in saved_groups]
        groups = state_checks.filled_groups(saved_groups, self.param_groups, self.defaults, self._signature_keys,
                                            kind, self._validate_group)
        owner = [g for g in groups for _ in g["params"]]
        for saved_id, p, group in zip(saved_ids, params, owner):
            state_checks.check_param_state(saved_id, saved_state.get(saved_id, {}), p, group,
                                           self._moment_keys, kind)
        before = {"state": self.state, "param_groups": self.param_groups}
        try:
            super().load_state_dict({**state_dict, "param_groups": [
                {**g, "params": saved["params"]} for g, saved in zip(groups, saved_groups)]})
            self._restore_float32_state(saved_state, saved_ids, params)
        except BaseException:
            self.__setstate__(before)
            raise
        self._skipped_on_device = None  # the loaded groups hold the whole count

    def state_dict(self) -> dict[str, Any]:
        """Stock format; ``param_groups[i]["skipped_steps"]`` is a plain int, as before ``sync_free`` existed
        (a sync-free count on the device is read here: one host sync per call)."""
        sd = super().state_dict()
        for saved, group in zip(sd["param_groups"], self._groups_with_skips()):
            if "skipped_steps" in group:
                saved["skipped_steps"] = group["skipped_steps"]
        return sd

    def _groups_with_skips(self) -> list[dict[str, Any]]:
        """The param groups (new dicts, same values), with the device count of skipped steps added."""
        if self._skipped_on_device is None:
            return self.param_groups
        extra = int(self._skipped_on_device)
        return [{**g, "skipped_steps": g.get("skipped_steps", 0) + extra} for g in self.param_groups]

    def _restore_float32_state(self, saved_state: dict, saved_ids: list, params: list[Tensor]) -> None:
        """torch casts floating state to the parameter's dtype on load; with master weights the masters and
        moments of a bf16 parameter are float32 and must come back bit for bit."""
        for saved_id, p in zip(saved_ids, params):
            saved = saved_state.get(saved_id, {})
            if "master_param" in saved:
                state = self.state[p]
                for key, value in saved.items():
                    if key != "step" and torch.is_tensor(value) and value.dtype != state[key].dtype:
                        state[key] = value.to(device=state[key].device, copy=True)

    # ------------------------------------------------------------------ telemetry
    def telemetry(self) -> dict[str, dict[str, float]]:
        """Last step's ‖x‖, ‖u‖ and trust ratio of every tensor that was updated.

        The numbers stay on the device during ``step()``; this call copies them to the host (one sync
        per parameter group). Keys are parameter names when the groups carry ``param_names``
        (:func:`largebatch.param_groups` adds them), otherwise ``"group{i}.{j}"``.
        """
        self._fold_partial_telemetry()
        out: dict[str, dict[str, float]] = {}
        for names, rows in self._telemetry.values():
            for name, (pn, un, ratio) in zip(names, rows.tolist()):
                out[name] = {"param_norm": pn, "update_norm": un, "trust_ratio": ratio}
        return out

    def telemetry_tensor(self, group_index: int = 0) -> tuple[list[str], Tensor]:
        """(names, [n, 3] tensor of param_norm, update_norm, trust_ratio) of one group, no copy."""
        self._fold_partial_telemetry()
        return self._telemetry[group_index]

    def _fold_partial_telemetry(self) -> None:
        """Merge the rows of ``step_params()`` calls into each group's (names, [n, 3]) entry."""
        for gi, rows in self._partial_telemetry.items():
            names, norms = self._telemetry.get(gi, ([], None))
            merged = dict(zip(names, norms.unbind(0))) if norms is not None else {}
            merged.update(rows)
            dtype = functools.reduce(torch.promote_types, (r.dtype for r in merged.values()))
            self._telemetry[gi] = (list(merged), torch.stack([r.to(dtype) for r in merged.values()]))
        self._partial_telemetry.clear()

    # ------------------------------------------------------------------ step()
    @torch.compiler.disable(reason=COMPILE_REASON)
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every group; the maths is the subclass's ``_step_group``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sync_free = self._resolve_sync_free()
        clip, finite = self._global_grad_check(sync_free)
        self._last_skipped, self._last_ok = False, None
        if finite is not None and (not sync_free or self.defaults["nonfinite"] == "raise"):
            # decided on the host before anything is written, so a skipped step leaves params, moments and
            # counters as they were; free on CPU, one host sync on an accelerator ("raise" must read it)
            if not bool(torch.isfinite(finite)):
                self._nonfinite_step()
                return loss
            finite = None
        ok = None
        if finite is not None:  # sync-free skip: every write is masked by the device flag (masked_writes.py)
            ok = torch.isfinite(finite)
            skipped = self._skipped_on_device
            self._skipped_on_device = (torch.zeros((), dtype=torch.int64, device=ok.device) if skipped is None
                                       else skipped).add_(ok.logical_not())
            self._last_ok = ok
        self._step_groups(None, clip, ok=ok, sync_free=sync_free)
        return loss

    def _resolve_sync_free(self) -> bool:
        """``sync_free`` as set, or (None) whether the first gradient is on an accelerator and every group
        may use the multi-tensor path."""
        flag = self.defaults["sync_free"]
        if flag is not None:
            return flag
        if any(g["foreach"] is False or g["fused"] for g in self.param_groups):
            return False
        grad = next((p.grad for g in self.param_groups for p in g["params"] if p.grad is not None), None)
        return grad is not None and grad.device.type != "cpu"

    @property
    def last_step_skipped(self) -> bool:
        """The last ``step()`` met a non-finite gradient and updated nothing (sync-free: reads the device flag,
        one host sync)."""
        if self._last_ok is not None:
            return not bool(self._last_ok)
        return self._last_skipped

    @torch.no_grad()
    def step_params(self, params: Sequence[Tensor]) -> None:
        """Update only ``params`` (some of this optimizer's parameters, those with a gradient), each with its
        group's settings, exactly as ``step()`` would update them; the other parameters are left alone.

        Per-tensor ratios make this exact for the paper's algorithms. Refused: ``max_grad_norm`` (NVLAMB's
        pre-normalisation divides by the norm of ALL gradients) and ``nonfinite="skip"`` (a skipped step
        leaves every tensor unchanged, which needs all gradients first); ``nonfinite="raise"`` checks these
        gradients and raises naming the first non-finite one before updating any of them. The telemetry rows
        of these tensors replace their previous ones. :func:`largebatch.step_in_backward` steps each tensor
        with it as soon as its gradient is complete.
        """
        check_subset_step(self.defaults)
        only = self._positions(params)
        self._last_skipped, self._last_ok = False, None
        if self.defaults["nonfinite"] == "raise":
            self._raise_if_nonfinite(only)
        self._step_groups(only, None, sync_free=self._resolve_sync_free())

    def _positions(self, params: Sequence[Tensor]) -> dict[int, list[int]]:
        """{group index: [positions in its ``params``]} of ``params``, from an index of every parameter that
        is rebuilt whenever an entry no longer matches (a changed ``param_groups``), so that stepping one
        tensor (``step_params``, once per tensor in :func:`largebatch.step_in_backward`) does not scan them all."""
        groups = self.param_groups
        index = self.__dict__.get("_param_positions") or {}
        out: dict[int, list[int]] = {}
        for p in params:
            where = index.get(id(p))
            if where is None or where[0] >= len(groups) or where[1] >= len(groups[where[0]]["params"]) \
                    or groups[where[0]]["params"][where[1]] is not p:
                index = {id(q): (gi, i) for gi, g in enumerate(groups) for i, q in enumerate(g["params"])}
                self.__dict__["_param_positions"] = index
                where = index.get(id(p))
                if where is None:
                    raise ValueError("Invalid params: a tensor that is not one of this optimizer's parameters "
                                     "(allowed: tensors of its param_groups)")
            out.setdefault(where[0], []).append(where[1])
        return {gi: sorted(set(pos)) for gi, pos in out.items()}

    def _step_groups(self, only: dict[int, list[int]] | None, clip: Tensor | None, *, ok: Tensor | None = None,
                     sync_free: bool = False) -> None:
        """``step()``'s updates; ``only``: positions of the parameters to update per group (None: all; see
        ``_positions``); ``ok``: the sync-free
        skip flag (0-dim bool on the device), every write masked by it; ``sync_free``: counters and
        coefficients on the device, the multi-tensor path."""
        for gi, group in enumerate(self.param_groups):
            if only is not None and gi not in only:
                continue
            indices, params, xs, grads, states = self._collect(group, self._init_state,
                                                               None if only is None else only[gi], sync_free)
            if not params:
                if only is None:
                    self._telemetry.pop(gi, None)
                    self._partial_telemetry.pop(gi, None)
                continue
            # multi-tensor ops and the kernel need one device and dtype: step each (device, dtype) bucket
            buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
            for i, x in enumerate(xs):
                buckets.setdefault((x.device, x.dtype), []).append(i)
            rows = []
            for idx in buckets.values():
                if len(buckets) == 1:  # the usual case: no copies of the lists
                    sub, bucket_xs, bucket_grads, bucket_states = params, xs, grads, states
                else:
                    sub, bucket_xs, bucket_grads, bucket_states = (
                        [seq[i] for i in idx] for seq in (params, xs, grads, states))
                # sharded (DTensor) parameters: the norms of the local shards must be summed across ranks
                # before any ratio is taken, which the per-tensor fused kernel cannot do
                sharded = any(type(p) not in _PLAIN and getattr(p, "placements", None) is not None for p in sub)
                trust = trust_mask(group["trust_ratio"], group["weight_decay"], len(idx), bucket_xs[0].device)
                flag = ok if ok is None or ok.device == bucket_xs[0].device else ok.to(bucket_xs[0].device)
                rows.append(self._step_group(group, sub, bucket_xs, bucket_grads, bucket_states, clip=clip,
                                             sharded=sharded, trust=trust, ok=flag, sync_free=sync_free))
            if len(rows) == 1:
                norms = rows[0]
            else:  # back to the group's order
                order = [i for idx in buckets.values() for i in idx]
                stacked = torch.cat([r.to(device=rows[0].device, dtype=torch.float64) for r in rows])
                norms = torch.empty_like(stacked)
                norms[torch.tensor(order, device=stacked.device)] = stacked
            self._sync_master(params, states)
            names = self._names(gi, group, indices)
            if ok is not None:  # a skipped step keeps the previous rows (NaN where there were none)
                norms = self._kept_rows(gi, names, norms, ok)
            if only is None:
                self._telemetry[gi] = (names, norms)
                self._partial_telemetry.pop(gi, None)
            else:  # folded into _telemetry when read: one merge per read, not one per tensor stepped
                self._partial_telemetry.setdefault(gi, {}).update(zip(names, norms.unbind(0)))

    def _kept_rows(self, gi: int, names: list[str], norms: Tensor, ok: Tensor) -> Tensor:
        """``norms`` where ``ok`` is set, else the group's previous telemetry rows (NaN if it has none)."""
        prev_names, prev = self._telemetry.get(gi, (None, None))
        if prev is None or prev_names != names or prev.shape != norms.shape or prev.device != norms.device:
            prev = torch.full_like(norms, math.nan)
        return torch.where(ok.to(norms.device), norms, prev.to(norms.dtype))

    def _step_group(self, group, params, xs, grads, states, *, clip, sharded, trust, ok=None,
                    sync_free=False) -> Tensor:
        """Update one group's tensors; return [n, 3] (‖x‖, ‖u‖, ratio). Subclasses implement it: with
        ``sync_free`` on the multi-tensor path with device coefficients, every write masked by ``ok``."""
        raise NotImplementedError

    @staticmethod
    def _init_state(x: Tensor, state: dict) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers for step()
    def _scratch(self, dtype: torch.dtype, numel: int) -> Tensor:
        """A CPU buffer reused across steps (not part of the state); grows to the largest request."""
        buf = self._scratch_buffers.get(dtype)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype)
            self._scratch_buffers[dtype] = buf
        return buf

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _names(self, gi: int, group: dict[str, Any], indices: list[int]) -> list[str]:
        names = group.get("param_names")
        if names is not None:
            return [names[i] for i in indices]
        return [f"group{gi}.{i}" for i in indices]

    def _global_grad_check(self, sync_free: bool = False) -> tuple[Tensor | None, Tensor | None]:
        """(NVLAMB pre-normalisation factor 1/max(1, ‖g‖_global/max_grad_norm) or None, a 0-dim tensor that
        is finite exactly when every gradient is, or None with ``nonfinite="propagate"``), from ONE
        reduction over every gradient of every group (sharded gradients are reduced across ranks).

        With ``max_grad_norm`` both come from ‖g‖²_global (a norm that overflows counts as non-finite);
        otherwise from the float64 sum of the max-|g| of each tensor, which cannot overflow; on contiguous
        CPU float32/float64 gradients that is one call of the C kernel instead (not with ``sync_free``, whose
        flag must stay a tensor on the gradients' device).
        """
        max_norm, policy = self.defaults["max_grad_norm"], self.defaults["nonfinite"]
        if max_norm is None and policy == "propagate":
            return None, None
        raw = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not raw:
            return None, None
        plain = all(type(t) in _PLAIN for t in raw)  # the common case: no DTensor lookups per tensor
        grads = raw if plain else [local_tensor(t) for t in raw]
        if any(t.is_sparse for t in grads):
            raise TypeError(f"{type(self).__name__} does not support sparse gradients")
        pg = None if plain else next((sharded_group(t) for t in raw if sharded_group(t) is not None), None)
        if max_norm is None and pg is None and not sync_free:
            first = kernel.first_nonfinite(grads) if kernel.available() else None
            if first is not None:
                return None, torch.tensor(0.0 if first < 0 else math.nan)
        total = _sum_over(grads, squared=max_norm is not None)
        if pg is not None:
            import torch.distributed as dist
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=pg)
        if max_norm is None:
            return None, total
        return 1.0 / torch.clamp(total.sqrt() / max_norm, min=1.0), None if policy == "propagate" else total

    def _raise_if_nonfinite(self, only: dict[int, list[int]] | None = None) -> None:
        """Raise naming the first parameter (at the positions ``only`` per group, unless None) whose gradient is
        not finite."""
        groups = self.param_groups
        chosen = ((gi, i) for gi, g in enumerate(groups) for i in range(len(g["params"]))) if only is None else \
            ((gi, i) for gi in sorted(only) for i in only[gi])
        found = [(gi, groups[gi], i, local_tensor(p.grad)) for gi, i in chosen
                 if (p := groups[gi]["params"][i]).grad is not None]
        if not found or (kernel.available() and kernel.first_nonfinite([f[3] for f in found]) == -1):
            return  # the kernel's check reads each gradient once and allocates nothing
        for gi, group, i, grad in found:
            if not bool(torch.isfinite(grad).all()):
                raise FloatingPointError(f"{type(self).__name__}: non-finite gradient in "
                                         f"{self._names(gi, group, [i])[0]} (nonfinite='raise'; nothing was updated)")

    def _nonfinite_step(self) -> None:
        """A step with a non-finite gradient: raise naming the first tensor, or count the skipped step."""
        if self.defaults["nonfinite"] == "raise":
            self._raise_if_nonfinite()
        for group in self.param_groups:
            group["skipped_steps"] = group.get("skipped_steps", 0) + 1
        self._last_skipped = True

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite gradient (``nonfinite="skip"``); saved in the state_dict. Sync-free,
        the count is a tensor on the device, read here (one host sync per call)."""
        return max((g.get("skipped_steps", 0) for g in self._groups_with_skips()), default=0)

    @staticmethod
    def _reduce_sq_norms(sq: Tensor, params: list[Tensor]) -> Tensor:
        """Sum per-tensor squared norms over the shards of sharded parameters: ONE all-reduce per group.

        ``sq`` is [n, k] local sums of squares; rows of unsharded tensors are left alone.
        """
        pg = None
        sharded_rows = []
        for i, p in enumerate(params):
            g = sharded_group(p)
            if g is not None:
                pg = g
                sharded_rows.append(i)
        if pg is None:
            return sq
        import torch.distributed as dist
        if len(sharded_rows) == len(params):
            dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=pg)
            return sq
        idx = torch.tensor(sharded_rows, device=sq.device)
        part = sq.index_select(0, idx)
        dist.all_reduce(part, op=dist.ReduceOp.SUM, group=pg)
        return sq.index_copy(0, idx, part)

    def _choose_impl(self, group: dict[str, Any], tensors: list[list[Tensor]], kernel_ok: bool) -> str:
        """'fused' (C CPU kernel), 'foreach' (multi-tensor, any device) or 'single_tensor'."""
        fused, foreach = group["fused"], group["foreach"]
        name = type(self).__name__
        if fused is None and foreach is None:
            if kernel_ok:
                if kernel.available():
                    return "fused"
                self._warn_once("nokernel", f"{name}: the fast CPU kernel is unavailable "
                                f"({kernel.unavailable_reason()}); using the foreach path")
                return "foreach"
            return "foreach" if tensors[0] and tensors[0][0].device.type != "cpu" else "single_tensor"
        if fused:
            if not kernel_ok:
                raise RuntimeError(
                    f"{name}(fused=True) needs contiguous float32/float64 CPU tensors without master weights "
                    "or sharding; pass fused=None to choose automatically")
            if not kernel.available():
                raise RuntimeError(f"{name}(fused=True): the CPU kernel is unavailable: "
                                   f"{kernel.unavailable_reason()}")
            return "fused"
        return "foreach" if foreach else "single_tensor"

    @staticmethod
    def _kernel_eligible(group: dict[str, Any], params: list[Tensor], *others: list[Tensor]) -> bool:
        """Contiguous CPU tensors of one float32/float64 dtype, no master weights. The caller has already
        ruled out sharded (DTensor) parameters. One plain loop: it runs over every tensor every step."""
        if not params or group["master_weights"]:
            return False
        dtype = params[0].dtype
        if dtype not in (torch.float32, torch.float64):
            return False
        for ts in (params, *others):
            for t in ts:
                if not t.is_cpu or t.dtype != dtype or not t.is_contiguous():
                    return False
        return True

    def _collect(self, group: dict[str, Any], init_state: Callable[[Tensor, dict], None],
                 only: list[int] | None = None, sync_free: bool = False):
        """Params with a gradient (at the positions ``only`` of the group, unless None), their compute tensors
        (fp32 master or local shard) and states.

        Returns (indices, params, xs, grads, states); ``xs`` are the tensors the update is written to.
        """
        indices, params, xs, grads, states = [], [], [], [], []
        plain = _PLAIN  # fast path: no DTensor unwrapping to try
        group_params = group["params"]
        for i in range(len(group_params)) if only is None else only:
            p = group_params[i]
            grad = p.grad
            if grad is None:
                continue
            if type(grad) not in plain:
                grad = local_tensor(grad)
            if grad.is_sparse:
                raise TypeError(f"{type(self).__name__} does not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:
                # state tensors are created like the parameter: DTensors for FSDP2 parameters, so that
                # distributed checkpoints can reshard them; the maths runs on their local shards
                # sync-free: on the parameter's device, as torch.optim's capturable Adam keeps it
                state["step"] = torch.zeros((), dtype=torch.float32, device=grad.device if sync_free else "cpu")
                if group["master_weights"] and p.dtype in _LOW_PRECISION:
                    state["master_param"] = p.detach().float().clone()
                init_state(state.get("master_param", p.detach()), state)
            x = state.get("master_param")
            if x is None:
                x = p if type(p) in plain else local_tensor(p)
            else:
                x = local_tensor(x)
                if grad.dtype != x.dtype:
                    grad = grad.to(x.dtype)
            indices.append(i)
            params.append(p)
            xs.append(x)
            grads.append(grad)
            states.append(state)
        return indices, params, xs, grads, states

    @staticmethod
    def _sync_master(params: list[Tensor], states: list[dict]) -> None:
        for p, s in zip(params, states):
            master = s.get("master_param")
            if master is not None:
                local_tensor(p).copy_(local_tensor(master))

    def _advance_steps(self, states: list[dict], ok: Tensor | None = None, sync_free: bool = False) -> Tensor:
        """Increment every per-parameter step counter and return them as one float64 tensor.

        Sync-free, the counters live on the tensors' device and are incremented by the skip flag ``ok``
        (unchanged on a skipped step), so the coefficients computed from them stay on the device too.

        The counters ``state["step"]`` stay ordinary 0-dim float32 tensors (as in torch.optim), but
        views into one buffer per bucket, so the increment is one op: ``torch._foreach_add_`` over
        thousands of scalar CPU tensors costs as much as the LAMB arithmetic (measured in
        benchmarks/optimizer_step/README.md). Whenever one
        counter is not such a view (first step, a loaded ``state_dict``, another set of parameters
        with gradients) the buffer is rebuilt from their values.
        """
        steps = [s["step"] for s in states]
        key = id(states[0])
        buf = self._step_buffers.get(key)
        device = _step_device(states) if sync_free else torch.device("cpu")
        if buf is None or len(buf) != len(steps) or buf.device != device or not _are_views(steps, buf):
            buf = torch.stack([torch.as_tensor(t).detach().to(device=device, dtype=torch.float32) for t in steps])
            for i, state in enumerate(states):
                state["step"] = buf[i]
            if len(self._step_buffers) >= 64:  # parameter sets come and go: keep the cache small
                self._step_buffers.clear()
            self._step_buffers[key] = buf
        buf.add_(1.0 if ok is None else ok)
        return buf.double()


def _step_device(states: list[dict]) -> torch.device:
    """Where a sync-free bucket's counters live: with its moments (any state tensor but ``step``)."""
    for key, value in states[0].items():
        if key != "step" and isinstance(value, Tensor):
            return local_tensor(value).device
    return torch.device("cpu")


def _sum_over(grads: list[Tensor], *, squared: bool) -> Tensor:
    """Σ‖g‖² (``squared``) or Σ max|g| over tensors of any dtypes and devices, as float64 on the first's."""
    by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in grads:
        if squared or t.numel():  # an empty tensor has no max (torch refuses it) and nothing to check
            by_kind.setdefault((t.device, t.dtype), []).append(t)
    device = grads[0].device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for (_, dtype), ts in by_kind.items():
        if squared:  # accumulate in at least float32: bf16 norms would be off by up to 2^-9
            norms = torch.stack(torch._foreach_norm(ts, 2, dtype=norm_dtype(dtype))).double().square()
        else:
            norms = torch.stack(torch._foreach_norm(ts, math.inf)).double()
        total = total + norms.sum().to(device)
    return total


def foreach_buckets(numels: Sequence[int], budget: int | None = None) -> list[range]:
    """Consecutive index ranges whose element counts sum to at most ``budget`` (a larger tensor alone)."""
    budget = FOREACH_BUCKET_ELEMENTS if budget is None else budget
    out, start, total = [], 0, 0
    for i, n in enumerate(numels):
        if i > start and total + n > budget:
            out.append(range(start, i))
            start, total = i, 0
        total += n
    if start < len(numels):
        out.append(range(start, len(numels)))
    return out


def run_in_buckets(fn: Callable[..., Tensor], lists: Sequence[list], rows: Sequence[Tensor], *rest,
                   **kwargs) -> Tensor:
    """``fn(*lists, *rows, *rest, **kwargs)`` over the buckets of ``foreach_buckets`` (``lists``: per-tensor
    lists, ``lists[0]`` the parameters; ``rows``: tensors with one row per parameter; ``rest`` passed as is);
    the [n, 3] results joined."""
    buckets = foreach_buckets([t.numel() for t in lists[0]])
    if len(buckets) == 1:
        return fn(*lists, *rows, *rest, **kwargs)
    return torch.cat([fn(*([seq[i] for i in b] for seq in lists), *(r[b.start:b.stop] for r in rows), *rest,
                         **kwargs) for b in buckets])


def _are_views(steps: list[Tensor], buf: Tensor) -> bool:
    """Whether steps[i] is buf[i] for every i: the same address (``buf`` is alive, so only a view of it can
    be there; we made those views 0-dim float32 and nothing else in the optimizer re-views them)."""
    base, size = buf.data_ptr(), buf.element_size()
    try:
        return [t.data_ptr() for t in steps] == list(range(base, base + size * len(steps), size))
    except AttributeError:  # a plain number (a state_dict written by another library)
        return False
