"""The toolkit comparison's output (``largebatch bench --toolkit``): a Markdown table and the JSON."""
from __future__ import annotations

from pathlib import Path

from .report import header, table_head, write_json_and_markdown
from .toolkit import RUNNERS, TARGETS


def _ratio(rows: dict, name: str, other: str, key: str) -> str:
    if name not in rows or other not in rows:
        return "—"
    return f"{rows[name][key] / rows[other][key]:.3f}"


def markdown(summary: dict) -> str:
    env, rows, work = summary["environment"], summary["rows"], summary["work"]
    lines = header("`largebatch train` vs a minimal loop vs HF Trainer", env,
                   f" · transformers {env['transformers']}",
                   "; each loop in its own thread, one optimizer step at a time under a baton")
    lines.append("Work: " + ", ".join(f"{k} {v}" for k, v in work.items()) + "\n")
    lines += table_head(f"samples/s, batch {summary['batch_size']}",
                        ["runner", "median ms", "min ms", "max ms", "samples/s (median step)",
                         "samples/s (all steps)", "× minimal loop", "× HF Trainer"])
    for name, r in rows.items():
        lines.append(f"| {name} | {r['median_ms']:.0f} | {r['min_ms']:.0f} | {r['max_ms']:.0f} | "
                     f"{r['samples_per_s']:.1f} | {r['samples_per_s_overall']:.1f} | "
                     f"{_ratio(rows, name, 'minimal loop', 'samples_per_s')} | "
                     f"{_ratio(rows, name, 'HF Trainer', 'samples_per_s')} |")
    lines.append("\n× columns: samples/s of the row ÷ samples/s of the column's runner (median steps). "
                 "All steps: samples over the summed step times, evaluations included.\n")
    for name in RUNNERS[:2]:
        for other, target in TARGETS.items():
            if name in rows and other in rows:
                value = rows[name]["samples_per_s"] / rows[other]["samples_per_s"]
                verdict = "met" if value >= target else "missed"
                lines.append(f"- {name} ÷ {other}: {value:.3f} (target ≥ {target}: {verdict} in this run)")
    return "\n".join(lines) + "\n"


def write(summary: dict, out_dir: Path) -> list[Path]:
    return write_json_and_markdown(summary, out_dir, "toolkit", markdown(summary))
