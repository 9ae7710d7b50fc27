"""Compiled kernels behind one API: GMM log-likelihood/gradient, HFC loss, Mahalanobis, k-NN/LID, KDE.

Every function accepts numpy arrays or torch tensors (float32/float64, any strides) and returns the same kind;
``backend="auto"|"cpu"|"torch"|"triton"|"cuda"`` selects the implementation (see ``engine.ops._backend``).
Bad input raises ``engine.errors.UserError`` naming the argument (also a TypeError for a wrong type or dtype;
the checks, shared by every backend, are in ``engine.ops._checks``).
"""

from engine.ops._backend import available
from engine.ops.gmm import gmm_log_prob, gmm_log_prob_grad, gmm_nearest, hfc_loss
from engine.ops.kde import kde_log_density
from engine.ops.knn import knn_distances, lid
from engine.ops.mahalanobis import mahalanobis

OPS = ("gmm", "mahalanobis", "knn", "kde")  # the kernel ops, by the names their backends register

__all__ = [
    "OPS",
    "available",
    "gmm_log_prob",
    "gmm_log_prob_grad",
    "gmm_nearest",
    "hfc_loss",
    "kde_log_density",
    "knn_distances",
    "lid",
    "mahalanobis",
]
