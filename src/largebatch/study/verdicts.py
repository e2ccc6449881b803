"""Verdicts: pure functions of the tables into sentences and statuses, with one rule throughout — a difference
counts only beyond the sum of the two seed half-ranges (:func:`largebatch.study.stats.beyond`)."""
from __future__ import annotations

import math

from .stats import beyond, finite, same_lr

def _ends(row: dict) -> tuple[int, int, dict, dict] | None:
    batches = sorted(row)
    if len(batches) < 2:
        return None
    return batches[0], batches[-1], row[batches[0]], row[batches[-1]]


def verdicts(table: dict, metric: str) -> list[str]:
    """Per optimizer, the smallest vs the largest batch: a drop counts only beyond the two seed half-ranges."""
    lines = []
    for opt, row in table.items():
        ends = _ends(row)
        if ends is None:
            continue
        b0, b1, small, large = ends
        drop = small["mean"] - large["mean"]
        noise = small["spread"] + large["spread"]
        k = b1 // b0
        one_seed = " (one seed at each end: no spread to judge against)" if small["n"] < 2 and large["n"] < 2 else ""
        if not math.isfinite(drop):
            lines.append(f"- **{opt}**: no finite result at one end of the ladder.")
        elif not beyond(drop, noise):
            lines.append(f"- **{opt}**: kept its quality over {k}× the batch: test {metric} {small['mean']:.4f} at "
                         f"{b0} vs {large['mean']:.4f} at {b1} (difference {drop:+.4f} within the "
                         f"seed spread ±{noise:.4f}){one_seed}.")
        else:
            lines.append(f"- **{opt}**: degraded over {k}× the batch: test {metric} {small['mean']:.4f} at "
                         f"{b0} → {large['mean']:.4f} at {b1} (−{drop:.4f}, beyond the seed spread "
                         f"±{noise:.4f}){one_seed}.")
    return lines


def compare_at_largest(table: dict, ref: str = "lamb") -> dict | None:
    """The optimizers at the largest batch of the ladder: ranking and each one's difference to ``ref``."""
    batches = sorted({b for row in table.values() for b in row})
    if not batches:
        return None
    b = batches[-1]
    cells = {o: row[b] for o, row in table.items() if b in row}
    ranking = sorted(cells, key=lambda o: -cells[o]["mean"] if finite(cells[o]["mean"]) else math.inf)
    out = {"batch": b, "ranking": [{"optimizer": o, "mean": cells[o]["mean"], "spread": cells[o]["spread"],
                                    "n": cells[o]["n"], "diverged": cells[o]["diverged"]} for o in ranking],
           "ref": ref if ref in cells else None, "vs_ref": {}}
    if ref in cells:
        r = cells[ref]
        for o, c in cells.items():
            if o == ref:
                continue
            diff = c["mean"] - r["mean"]
            noise = c["spread"] + r["spread"]
            status = ("n/a" if not math.isfinite(diff) else
                      "within spread" if not beyond(abs(diff), noise) else ("above" if diff > 0 else "below"))
            out["vs_ref"][o] = {"difference": diff, "noise": noise, "status": status}
    return out


def _change(row: dict | None) -> dict | None:
    """Smallest -> largest batch of one optimizer: drop, noise, diverged at the largest batch."""
    if not row:
        return None
    ends = _ends(row)
    if ends is None:
        return None
    b0, b1, s, l = ends
    return {"b0": b0, "b1": b1, "small": s["mean"], "large": l["mean"], "drop": s["mean"] - l["mean"],
            "noise": s["spread"] + l["spread"], "diverged": l["diverged"] + s["diverged"],
            "diverged_large": l["diverged"], "n_large": l["n"], "n_small": s["n"], "one_seed": s["n"] < 2 and l["n"] < 2}


def _fmt_change(c: dict, metric: str) -> str:
    return (f"test {metric} {c['small']:.4f} at batch {c['b0']} → {c['large']:.4f} at {c['b1']} "
            f"(change {-c['drop']:+.4f}, seed spread ±{c['noise']:.4f})")


def claim_summary(table: dict, task: str, metric: str, ref: str = "lamb", ladder: tuple | None = None,
                  unigram: float | None = None) -> list[dict]:
    """For each part of the paper's claim: {part, status in held / did not hold / inconclusive / not measured, text}.

    LAMB keeps its quality: held if the change smallest -> largest batch is within the seed spread (or a gain),
    did not hold if it drops beyond the spread or diverges. AdamW degrades / LARS fails (MLM only): held if the
    drop exceeds the spread or runs diverge at the largest batch, did not hold if the result rises beyond the
    spread, inconclusive if within the spread. With one seed at both ends there is no spread: inconclusive; a
    LAMB result at or below the unigram baseline at both ends (nothing learned beyond word frequencies) too.
    """
    parts = [("lamb", "keeps", "LAMB keeps its quality over the ladder" if ref == "lamb" else
              f"LAMB ({ref}) keeps its quality over the ladder"),
             ("adamw", "degrades", "AdamW degrades at the largest batch")]
    if task == "mlm":
        parts.append(("lars", "degrades", "LARS fails on the attention model"))
    cmp = compare_at_largest(table, ref) or {"vs_ref": {}}
    out = []
    for opt, kind, part in parts:
        key = ref if opt == "lamb" else opt
        row = table.get(key)
        c = _change(row)
        if c is None:
            have = sorted(row) if row else []
            why = f"only batch {have[0]} finished so far" if have else f"no {key} ladder runs"
            out.append({"part": part, "optimizer": key, "status": "not measured", "text": f"not measured yet ({why})."})
            continue
        measured = math.isfinite(c["drop"])
        if kind == "keeps":
            if c["diverged_large"] or not measured:
                status = "did not hold"
            elif beyond(c["drop"], c["noise"]):
                status = "inconclusive" if c["one_seed"] else "did not hold"
            elif unigram is not None and finite(c["small"]) and max(c["small"], c["large"]) <= unigram + 1e-6:
                status = "inconclusive"  # nothing learned beyond word frequencies at either end
            else:
                status = "inconclusive" if c["one_seed"] and c["drop"] > 0 else "held"
        else:
            if c["diverged_large"] or (not measured and math.isfinite(c["small"])):
                status = "held"
            elif not measured:
                status = "inconclusive"
            elif c["one_seed"]:
                status = "inconclusive"
            elif beyond(c["drop"], c["noise"]):
                status = "held"
            elif beyond(-c["drop"], c["noise"]):
                status = "did not hold"
            else:
                status = "inconclusive"
        text = _fmt_change(c, metric) if measured else f"no finite test {metric} at one end of the ladder"
        if c["diverged"]:
            text += f"; {c['diverged']} run(s) diverged"
        if c["one_seed"]:
            text += "; one seed at each end, so no spread to judge against"
        if ladder and c["b1"] < max(ladder):
            text += f"; ladder incomplete: batch {c['b1']} is the largest finished so far (the suite goes to {max(ladder)})"
        if unigram is not None and finite(c["large"]) and c["large"] <= unigram + 1e-6:
            text += f"; at batch {c['b1']} it is at or below the unigram baseline {unigram:.4f}"
        v = cmp["vs_ref"].get(key)
        if v and math.isfinite(v["difference"]):
            text += (f"; at batch {cmp['batch']} it is {v['difference']:+.4f} vs {ref} "
                     f"({'within' if v['status'] == 'within spread' else 'beyond'} the spread ±{v['noise']:.4f})")
        out.append({"part": part, "optimizer": key, "status": status, "text": text + "."})
    return out


def claim_paragraph(claims: list[dict]) -> str:
    """One plain sentence over the parts of the claim and their status."""
    if not claims:
        return ""
    counts = {s: sum(c["status"] == s for c in claims) for s in ("held", "did not hold", "inconclusive", "not measured")}
    parts = "; ".join(f"{c['part']}: {c['status']}" for c in claims)
    tally = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    return f"In short, of the {len(claims)} parts of the claim this suite tests: {tally}. {parts}."


def two_phase_comparison(tp: dict) -> str:
    a, b = tp.get("two-phase"), tp.get("two-phase-twin")
    if not a or not b:
        return "Only one of the two runs has finished; no comparison yet."
    diff = a["accuracy_mean"] - b["accuracy_mean"]
    noise = (a["accuracy_spread"] or 0) + (b["accuracy_spread"] or 0)
    if not math.isfinite(diff):
        return "No finite test accuracy for one of the two; no comparison."
    how = "within" if not beyond(abs(diff), noise) else "beyond"
    word = "matched" if how == "within" else ("beat" if diff > 0 else "fell short of")
    ratio = f" in {a['steps']} vs {b['steps']} steps ({a['steps'] / b['steps']:.2f}×)" if a["steps"] and b["steps"] else ""
    return (f"The two-phase run {word} its single-phase twin: test accuracy {a['accuracy_mean']:.4f} vs "
            f"{b['accuracy_mean']:.4f} ({diff:+.4f}, {how} the seed spread ±{noise:.4f}){ratio}.")


def _vs(a: dict | None, b: dict | None) -> tuple[float, float] | None:
    """a − b and the noise (sum of half-ranges), or None when either is missing or not finite."""
    if not a or not b or not (finite(a["mean"]) and finite(b["mean"])):
        return None
    return a["mean"] - b["mean"], (a["spread"] or 0) + (b["spread"] or 0)


def rule_reading(opt: str, c: dict, metric: str) -> str:
    """Did the √ rule give ``opt`` a bad LR at the largest batch? Its tuned cell against its √-rule cell."""
    b, sq, tu = c["batch"], c["sqrt"], c["tuned"]
    pending = " (provisional: the tuned sweep is not finished)" if c["provisional"] else ""
    if sq is None:
        return f"- **{opt}** at batch {b}: √-rule run pending; own best LR so far {c['lr']:.3g}{pending}."
    if c["lr"] is not None and same_lr(c["lr"], sq["lr"]):
        return (f"- **{opt}** at batch {b}: the √ rule's LR {sq['lr']:.3g} is also its best LR on the grid at "
                f"this batch{pending}: the rule did not cost it anything here.")
    d = _vs(tu, sq)
    if d is None:
        return f"- **{opt}** at batch {b}: own best LR {c['lr']:.3g} vs √-rule LR {sq['lr']:.3g}; no finite comparison yet{pending}."
    diff, noise = d
    n = f"(n={tu['n']} vs n={sq['n']})"
    if tu["n"] < 2 and sq["n"] < 2:
        return (f"- {opt} at batch {b}: own LR {c['lr']:.3g} gives {tu['mean']:.4f} vs {sq['mean']:.4f} at the √-rule "
                f"LR {sq['lr']:.3g} ({diff:+.4f}); not judged yet (one seed each, no spread){pending}.")
    if beyond(diff, noise):
        return (f"- **{opt}** at batch {b}: **the √ rule gave it a bad LR** — with its own LR {c['lr']:.3g} test "
                f"{metric} {tu['mean']:.4f} vs {sq['mean']:.4f} at the √-rule LR {sq['lr']:.3g} "
                f"({diff:+.4f}, beyond ±{noise:.4f}) {n}{pending}.")
    return (f"- **{opt}** at batch {b}: its own LR {c['lr']:.3g} gives {tu['mean']:.4f} vs {sq['mean']:.4f} at the "
            f"√-rule LR {sq['lr']:.3g} ({diff:+.4f}, within ±{noise:.4f}) {n}: the rule's LR is as good{pending}.")


def tuned_reading(opt: str, c: dict, ref: str, r: dict, metric: str) -> str:
    """Can ``opt`` reach ``ref``'s quality at the largest batch with its own best LR? Tuned against tuned."""
    d = _vs(c["tuned"], r["tuned"])
    b = c["batch"]
    pending = " (provisional)" if c["provisional"] or r["provisional"] else ""
    if d is None:
        return f"- **{opt}** vs {ref}, both tuned at batch {b}: pending."
    diff, noise = d
    tu, rt = c["tuned"], r["tuned"]
    nums = (f"{tu['mean']:.4f} at LR {c['lr']:.3g} vs {rt['mean']:.4f} at LR {r['lr']:.3g} "
            f"({diff:+.4f}, {'beyond' if beyond(abs(diff), noise) else 'within'} ±{noise:.4f}){pending}")
    if tu["n"] < 2 and rt["n"] < 2:
        return (f"- {opt} vs {ref}, both at their own best LR at batch {b}: not judged yet (one seed each, no "
                f"spread): {tu['mean']:.4f} at LR {c['lr']:.3g} vs {rt['mean']:.4f} at LR {r['lr']:.3g} "
                f"({diff:+.4f}){pending}.")
    if not beyond(abs(diff), noise):
        return f"- **{opt}** vs {ref}, both at their own best LR at batch {b}: as good within the spread: {nums}."
    if diff < 0:
        return (f"- **{opt}** vs {ref}, both at their own best LR at batch {b}: **{opt} does not reach {ref}'s "
                f"quality with any LR tried**: {nums}.")
    return f"- **{opt}** vs {ref}, both at their own best LR at batch {b}: **{opt} beats {ref}**: {nums}."


def tuned_readings(control: dict, metric: str, ref: str = "lamb") -> list[str]:
    """Both readings of a result at the largest batch: the rule's LR (per optimizer), then the optimizer at its
    own best LR against ``ref`` at its own best LR (the paper's claim: its AdamW baseline was tuned)."""
    lines = [rule_reading(o, c, metric) for o, c in control.items()]
    if ref in control:
        lines += [tuned_reading(o, c, ref, control[ref], metric) for o, c in control.items() if o != ref]
    return lines


def against_baseline(table: dict, base: dict | None, name: str, conclusion: str = "") -> list[str]:
    """Each pre-training cell against a baseline cell: above / within / below the two spreads; ``conclusion``
    is said when no cell is above."""
    if not base or not finite(base["mean"]):
        return []
    groups: dict[str, list[str]] = {"above": [], "within": [], "below": []}
    for opt, row in table.items():
        for batch, c in sorted(row.items()):
            d = _vs(c, base)
            if d is None:
                continue
            diff, noise = d
            where = "within" if not beyond(abs(diff), noise) else ("above" if diff > 0 else "below")
            groups[where].append(f"{opt} {batch} ({diff:+.4f} ±{noise:.4f})")
    words = {"above": f"beat the {name} beyond the spread", "within": f"are within the spread of the {name}",
             "below": f"fall below the {name} beyond the spread"}
    lines = [f"- {len(v)} pre-trained cell(s) {words[k]}: {', '.join(v)}." for k, v in groups.items() if v]
    if lines and not groups["above"]:
        lines.insert(0, f"- **No pre-trained encoder beats the {name} beyond the spread**{conclusion}.")
    return lines
