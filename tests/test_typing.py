"""Packaging: the public API is annotated and passes mypy (configured in pyproject.toml, [tool.mypy]),
ships py.typed, and the LICENSE file is the licence pyproject.toml declares."""
from __future__ import annotations

import importlib.util
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import largebatch
import largebatch.optim
import largebatch.schedules

ROOT = Path(__file__).resolve().parents[1]


def _public_callables():
    """(qualified name, function) of every public function and public method (``__init__`` included) that
    ``largebatch``, ``largebatch.optim`` and ``largebatch.schedules`` export, inherited ones too."""
    modules = [(largebatch, [n for n in largebatch.__all__ if n != "__version__"]),
               (largebatch.optim, largebatch.optim.__all__),
               (largebatch.schedules, [n for n, v in vars(largebatch.schedules).items()
                                       if not n.startswith("_") and getattr(v, "__module__", None)
                                       == largebatch.schedules.__name__])]
    for module, names in modules:
        for name in names:
            obj = getattr(module, name)
            if inspect.isfunction(obj):
                yield f"{module.__name__}.{name}", obj
            elif inspect.isclass(obj):
                for cls in obj.__mro__:
                    if not cls.__module__.startswith("largebatch"):
                        continue
                    for attr, fn in vars(cls).items():
                        if inspect.isfunction(fn) and (not attr.startswith("_") or attr == "__init__"):
                            yield f"{cls.__module__}.{cls.__qualname__}.{attr}", fn


def test_public_api_is_annotated():
    missing = set()
    for name, fn in _public_callables():
        sig = inspect.signature(fn)
        bare = [p for p, v in sig.parameters.items() if p not in ("self", "cls") and v.annotation is v.empty]
        if sig.return_annotation is sig.empty and fn.__name__ != "__init__":
            bare.append("return")
        if bare:
            missing.add(f"{name}: {', '.join(bare)}")
    assert not missing, "public API without type hints:\n" + "\n".join(sorted(missing))


def test_public_api_passes_mypy():
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed: pip install 'largebatch[test]' (or bash scripts/install.sh test)")
    out = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr


def test_py_typed_and_the_license_match_pyproject():
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["largebatch"]
    assert (Path(largebatch.__file__).parent / "py.typed").is_file()
    assert config["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text[:200] and "Version 2.0, January 2004" in text[:200]
    assert config["project"]["license-files"] == ["LICENSE"]


def test_api_doc_names_every_public_name():
    doc = (ROOT / "docs" / "api.md").read_text()
    names = set(largebatch.__all__)
    names |= set(largebatch.optim.__all__)
    names |= {n for n, v in vars(largebatch.schedules).items()
              if not n.startswith("_") and getattr(v, "__module__", None) == largebatch.schedules.__name__}
    names |= {"OPTIMIZER_STATE_POLICIES", "OptimizerStatePolicy", "SCHEDULES", "Schedule"}
    names |= {f"largebatch.{m}" for m in largebatch.SUBMODULES}
    missing = sorted(n for n in names if f"`{n}`" not in doc and f"`{n}(" not in doc)
    assert not missing, f"docs/api.md does not name: {missing}"


@pytest.mark.parametrize("module", [largebatch, largebatch.optim, largebatch.schedules], ids=lambda m: m.__name__)
def test_api_doc_names_only_what_exists(module):
    """Each name in the first column of a module's table in docs/api.md is an attribute of that module."""
    doc = (ROOT / "docs" / "api.md").read_text()
    section = doc.split(f"## `{module.__name__}`\n", 1)[1].split("\n## ", 1)[0]
    names = [n for row in re.findall(r"^\| (.+?) \|", section, re.M) for n in re.findall(r"`(\w+)`", row)]
    missing = [n for n in names if not hasattr(module, n)]
    assert names and not missing, f"docs/api.md names what {module.__name__} does not have: {missing}"
