"""Every ```python block of docs/integrations.md runs: the setup block, then each example in its own
namespace, in a temporary folder. A block that imports a missing package is skipped with the package's
name; blocks fenced ```python no-run are documentation only (the page says why)."""
from __future__ import annotations

import functools
import re
import sys
from pathlib import Path

import pytest
import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
FENCE = re.compile(r"^## (?P<title>.+?)$|^```python(?P<info>[^\n]*)\n(?P<code>.*?)^```$", re.M | re.S)


def _blocks() -> list[tuple[str, str, str]]:
    """(section title, info string, code) of each python block, in order."""
    out, title = [], ""
    for m in FENCE.finditer(DOC.read_text()):
        if m["title"]:
            title = m["title"]
        else:
            out.append((title, m["info"].strip(), m["code"]))
    return out


BLOCKS = _blocks()
SETUP = BLOCKS[0][2]
EXAMPLES = [(title, code) for title, info, code in BLOCKS[1:] if "no-run" not in info]


def test_the_page_has_its_examples():
    assert BLOCKS[0][0] == "Setup used by the examples"
    assert len(EXAMPLES) == 5 and len(BLOCKS) == 7


@pytest.mark.parametrize("code", [code for _, code in EXAMPLES], ids=[title for title, _ in EXAMPLES])
def test_example_runs(code, tmp_path, monkeypatch):
    for module in re.findall(r"^(?:from|import) (\w+)", code, re.M):
        pytest.importorskip(module, reason=f"{module} is not installed; bash scripts/install.sh test")
    if "accelerate" in sys.modules:  # one AcceleratorState per process: earlier tests (Trainer) made one
        from accelerate.state import AcceleratorState
        AcceleratorState._reset_state(True)
    # inductor needs about 75 s on 2 cores to compile even this net; what the example shows (step() runs
    # eagerly, fullgraph=True stops with our message) happens before any backend is involved
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "docs_example"}
    exec(compile(SETUP, f"{DOC.name}:setup", "exec"), namespace)
    exec(compile(code, f"{DOC.name}:example", "exec"), namespace)
