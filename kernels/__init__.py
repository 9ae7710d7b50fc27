"""Triton kernels for engine.ops (backend "triton"): one module per op, each registering its launcher.

Imported lazily by ``engine.ops._backend`` the first time backend "triton" is requested, so ``import engine``
never imports triton. Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (used by the tests).
"""

from engine.kernels import gmm, kde, knn, mahalanobis

__all__ = ["gmm", "kde", "knn", "mahalanobis"]
