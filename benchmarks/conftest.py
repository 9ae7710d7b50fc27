"""Collect ``bench_*.py`` as test modules, so ``pytest benchmarks/ --benchmark-only`` runs the suite."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    """bench_*.py under this directory (files named on the command line are collected by pytest itself)."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
