"""Every `>>>` example in the package's docstrings runs, found by walking `qat/`."""

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for p in (ROOT / "qat").rglob("*.py")
    if ">>>" in p.read_text()
)


def test_examples_are_found():
    assert len(MODULES) >= 20, MODULES


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_run(module, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)  # examples read configs/recipe/*.yaml
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
