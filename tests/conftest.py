"""Fixtures shared by every test folder."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One data cache per test process: datasets are built once, then read."""
    return tmp_path_factory.mktemp("data_cache")


def pytest_terminal_summary(terminalreporter) -> None:
    """Say which CPU kernel family the ONNX tests ran on (shown with -q too)."""
    from qat.export.onnx.cpu import FAMILIES, cpu_family, describe

    here = cpu_family()
    other = next(f for f in FAMILIES if f != here)
    terminalreporter.write_line(f"ONNX Runtime integer kernels: this CPU is {describe(here)}; "
                                f"the other family, {other}, is emulated in every parity test")
