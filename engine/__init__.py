"""hfc-engine: adversarial-robustness audits of medical image classifiers.

Submodules load on first use, so ``import engine`` (and the CLI's --help) stays fast.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import subprocess
from pathlib import Path
from typing import Any

__version__ = "0.1.0"
BUILD_COMMIT_FILE = Path(__file__).resolve().parent / "BUILD_COMMIT"  # written by setup.py at build time


def build_commit() -> str | None:
    """The engine's git commit recorded by setup.py when it was built (None for a build outside a checkout)."""
    return BUILD_COMMIT_FILE.read_text().strip() or None if BUILD_COMMIT_FILE.is_file() else None


def git_commit() -> str | None:
    """The engine's commit: the checkout's when it runs from one (the folder above engine/ holds .git), else the
    one recorded at build time, else None."""
    checkout = BUILD_COMMIT_FILE.parent.parent
    if (checkout / ".git").exists():
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            out = None
        if out is not None and out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return build_commit()


def _preload_openblas() -> None:
    """Load OpenBLAS from the installed scipy-openblas32 wheel before engine._C needs it.

    The extension links libscipy_openblas.so; under pip's build isolation the build-time copy (and so the
    rpath) is gone after installation, so the runtime copy is loaded by path here and matched by its soname.
    """
    try:
        import scipy_openblas32
    except ImportError:  # engine._C then reports the missing library when first used
        return
    path = os.path.join(scipy_openblas32.get_lib_dir(), f"lib{scipy_openblas32.get_library()}.so")
    if os.path.exists(path):
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


_preload_openblas()

_LAZY = {
    "ops": ("engine.ops", None),
    "data": ("engine.data", None),
    "models": ("engine.models", None),
    "attacks": ("engine.attacks", None),
    "detectors": ("engine.detectors", None),
    "export": ("engine.export", None),
    "GaussianMixture": ("engine.mixture", "GaussianMixture"),
    "audit": ("engine.auditing", "audit"),
    "AuditReport": ("engine.auditing", "AuditReport"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


__all__ = list(_LAZY)
