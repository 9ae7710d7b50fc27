"""Statistics shared by every layer: ROC-based detection metrics with bootstrap CIs, classification metrics,
paired significance and equivalence tests, confidence intervals over seeds, feature-shift measures. Plain
numpy/scipy; each equals an independent reference (sklearn, scipy, statsmodels) in the tests.
"""

from engine.metrics.classification import accuracy, classification_metrics, confusion_matrix, quadratic_weighted_kappa
from engine.metrics.roc import (
    auroc,
    bootstrap_metrics,
    detection_accuracy,
    partial_auroc,
    roc_curves,
    tnr_at_tpr,
    tpr_at_tnr,
)
from engine.metrics.shift import mean_pairwise_cosine, relative_deviation, weighted_pairwise_cosine
from engine.metrics.significance import (
    binomial_ci,
    mean_ci,
    paired_ttest,
    percentile_ci,
    resample_kappas,
    robust_location_scale,
    tost_paired,
)

__all__ = [
    "accuracy",
    "auroc",
    "binomial_ci",
    "bootstrap_metrics",
    "classification_metrics",
    "confusion_matrix",
    "detection_accuracy",
    "mean_ci",
    "mean_pairwise_cosine",
    "paired_ttest",
    "partial_auroc",
    "percentile_ci",
    "quadratic_weighted_kappa",
    "relative_deviation",
    "resample_kappas",
    "robust_location_scale",
    "roc_curves",
    "tnr_at_tpr",
    "tost_paired",
    "tpr_at_tnr",
    "weighted_pairwise_cosine",
]
