"""The end-to-end benchmark's output: one Markdown table per (model, precision), and the JSON."""
from __future__ import annotations

from pathlib import Path

from .report import header, table_head, write_json_and_markdown


def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def _row(r: dict, adamw_peak: float | None) -> str:
    extra = ""
    if r["in_backward"]:
        extra = (f" (× Lamb {_fmt(r.get('ratio_to_lamb'), '.3f')}, min {_fmt(r.get('ratio_min_to_lamb'), '.3f')}; "
                 f"peak −{_fmt(r.get('peak_saving_mib'), '.0f')} MiB = {_fmt(r.get('peak_saving_vs_grad_bytes'), '.2f')}"
                 f" × the {_fmt(r.get('grad_mib'), '.0f')} MiB of gradients)")
    vs_adamw = None if r["peak_mib"] is None or adamw_peak is None else r["peak_mib"] - adamw_peak
    share = None if r["optimizer_share"] is None else 100 * r["optimizer_share"]
    return (f"| {r['variant']}{extra} | {r['median_ms']:.0f} | {_fmt(r['iqr_ms'], '.0f')} | {r['min_ms']:.0f} | "
            f"{r['samples_per_s']:.2f} | {r['forward_ms']:.0f} | {r['backward_ms']:.0f} | {r['optimizer_ms']:.1f} | "
            f"{_fmt(share, '.1f')} | **{r['ratio_to_fused_adamw']:.3f}** | {r['ratio_min_to_fused_adamw']:.3f} | "
            f"{_fmt(r['peak_mib'], '.0f')} | {_fmt(vs_adamw, '+.0f')} |")


def markdown(summary: dict) -> str:
    env = summary["environment"]
    lines = header("End-to-end training step benchmark", env, f" · transformers {env['transformers']}",
                   " · peak memory: peak RSS of one step in a fresh process, minus its RSS before the model was built")
    for s in summary["sets"]:
        lines += table_head(f"{s['workload']}, {s['precision']}, batch {s['batch_size']} "
                            f"({s['params_millions']:.1f} M parameters)",
                            ["variant", "step median ms", "IQR ms", "min ms", "samples/s", "forward ms", "backward ms",
                             "optimizer ms", "optimizer %", "× fused AdamW", "× fused AdamW (min)", "peak MiB",
                             "peak − AdamW's MiB"])
        adamw_peak = s["rows"][0]["peak_mib"]
        lines += [_row(r, adamw_peak) for r in s["rows"]]
        errors = [f"{r['variant']}: {r['memory']['error']}" for r in s["rows"] if (r["memory"] or {}).get("error")]
        if errors:
            lines.append("\nMemory not measured: " + "; ".join(errors))
    return "\n".join(lines) + "\n"


def write(summary: dict, out_dir: Path) -> list[Path]:
    return write_json_and_markdown(summary, out_dir, "results", markdown(summary))
