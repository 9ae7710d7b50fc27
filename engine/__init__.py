"""hfc-engine: adversarial-robustness audits of medical image classifiers.

Submodules load on first use, so ``import engine`` (and the CLI's --help) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "ops": ("engine.ops", None),
    "data": ("engine.data", None),
    "models": ("engine.models", None),
    "attacks": ("engine.attacks", None),
    "detectors": ("engine.detectors", None),
    "export": ("engine.export", None),
    "GaussianMixture": ("engine.mixture", "GaussianMixture"),
    "audit": ("engine.audit", "audit"),
    "AuditReport": ("engine.audit", "AuditReport"),
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
