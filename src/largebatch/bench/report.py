"""Benchmark output: a Markdown table, JSON and a PNG bar chart."""
from __future__ import annotations

import json
from pathlib import Path

from .profile import markdown as profile_markdown


def _fmt(v, spec):
    return "—" if v is None else format(v, spec)


def header(title: str, env: dict, machine: str, method: str) -> list[str]:
    """A benchmark report's title, its environment line (``machine`` and ``method`` add to it) and command."""
    return [f"# {title}\n",
            (f"{env['date']} · torch {env['torch']} · {env['threads']} threads · {env['cpu']}{machine} · load "
             f"average before/after {env['load_before']} / {env['load_after']} · {env['steps']} timed steps after "
             f"{env['warmup']} warm-up, round-robin in a shuffled order{method}\n"),
            f"Command: `{env['command']}`\n"]


def table_head(title: str, columns: list[str]) -> list[str]:
    """A section title and a markdown table's header, the first column left-aligned and the rest right."""
    return [f"\n## {title}\n", "| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]


def markdown(summary: dict) -> str:
    env = summary["environment"]
    lines = header("Optimizer step benchmark", env, f" · bandwidth probe {env['bandwidth_gbs']:.1f} GB/s (a += s·b)",
                   "; medians, and the fastest step (least disturbed by the host)")
    for s in summary["sets"]:
        lines += table_head(f"{s['set']}: {s['tensors']} tensors, {s['params_millions']:.1f} M parameters (largest "
                            f"tensor {s['largest_tensor_mib']:.1f} MiB; 28 B/param floor {s['bandwidth_floor_ms']:.1f} ms)",
                            ["optimizer", "median ms", "IQR ms", "× fused AdamW", "min ms", "× fused AdamW (min)",
                             "× bandwidth floor", "peak extra MiB", "extra / largest tensor"])
        for r in s["rows"]:
            if r.get("median_ms") is None:
                lines.append(f"| {r['optimizer']} | {r['error']} | | | | | | | |")
                continue
            lines.append(f"| {r['optimizer']} | {r['median_ms']:.1f} | {_fmt(r['iqr_ms'], '.1f')} | "
                         f"{r['ratio_to_fused_adamw']:.2f} | {_fmt(r.get('min_ms'), '.1f')} | "
                         f"{_fmt(r.get('ratio_min_to_fused_adamw'), '.2f')} | {r['ratio_to_bandwidth_floor']:.2f} | "
                         f"{_fmt(r['peak_extra_mib'], '.1f')} | {_fmt(r['peak_extra_vs_largest_tensor'], '.2f')} |")
    lines += _pairs_table(summary["sets"])
    text = "\n".join(lines) + "\n"
    prof = summary.get("profile") or {}
    if prof.get("sets"):
        text += profile_markdown(prof["sets"], prof.get("compute") or {}, env["bandwidth_gbs"])
    return text


def _pairs_table(sets: list[dict]) -> list[str]:
    """Step time of one variant ÷ another's in the same run (the non-finite check's cost), when measured."""
    rows = [(s["set"], p) for s in sets for p in s.get("pairs", [])]
    if not rows:
        return []
    lines = ["\n## Variant ÷ variant, same tensors, same rounds (the non-finite check's cost)\n",
             "| set | optimizer | ÷ | median ÷ median | min ÷ min | median of per-round ratios |",
             "|---|---|---|---:|---:|---:|"]
    for name, p in rows:
        lines.append(f"| {name} | {p['optimizer']} | {p['versus']} | {p['ratio_median']:.3f} | {p['ratio_min']:.3f} "
                     f"| {p['ratio_per_round_median']:.3f} |")
    return lines


def plot(summary: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = summary["sets"]
    fig, axes = plt.subplots(1, len(sets), figsize=(5.2 * len(sets), 4.8), squeeze=False)
    for ax, s in zip(axes[0], sets):
        rows = [r for r in s["rows"] if r.get("ratio_to_fused_adamw") is not None]
        names = [r["optimizer"] for r in rows]
        vals = [r["ratio_to_fused_adamw"] for r in rows]
        colors = ["#888888" if n.startswith("torch AdamW") else "#1f77b4" if n.startswith("largebatch") else "#d62728"
                  for n in names]
        ax.barh(range(len(rows)), vals, color=colors)
        ax.set_yticks(range(len(rows)), names, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.2f}×", va="center", fontsize=7)
        ax.set_title(f"{s['set']} ({s['params_millions']:.1f} M params, {s['tensors']} tensors)", fontsize=9)
        ax.set_xlabel("step time ÷ torch AdamW(fused=True), log scale")
    fig.suptitle("One optimizer step, fp32, CPU (blue: largebatch, red: peers, grey: yardstick)", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_json_and_markdown(summary: dict, out_dir: Path, stem: str, text: str) -> list[Path]:
    """``<stem>.json`` (the summary) and ``<stem>.md`` (``text``) in ``out_dir``, created if needed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    paths[0].write_text(json.dumps(summary, indent=2))
    paths[1].write_text(text)
    return paths


def write(summary: dict, out_dir: Path) -> list[Path]:
    return write_json_and_markdown(summary, out_dir, "results", markdown(summary)) + [
        plot(summary, out_dir / "step_time.png")]
