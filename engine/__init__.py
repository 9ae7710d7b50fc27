"""hfc-engine: adversarial-robustness audits of medical image classifiers.

Submodules load on first use, so ``import engine`` (and the CLI's --help) stays fast.
"""

from __future__ import annotations

import ctypes
import importlib
import os
from typing import Any

__version__ = "0.1.0"


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
