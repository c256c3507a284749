"""Fixtures shared by every test folder."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One data cache per test process: datasets are built once, then read."""
    return tmp_path_factory.mktemp("data_cache")
