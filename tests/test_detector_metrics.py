"""Detection metrics against sklearn and hand-computed values; the vectorised bootstrap against a plain loop."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from engine.metrics.roc import (
    BOOT_CHUNK,
    auroc,
    bootstrap_metrics,
    bootstrap_weights,
    detection_accuracy,
    partial_auroc,
    tnr_at_tpr,
    tpr_at_tnr,
)


def _sk(neg: np.ndarray, pos: np.ndarray, **kw) -> float:
    return roc_auc_score(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos], **kw)


@pytest.mark.parametrize("n_neg,n_pos", [(1, 1), (1, 7), (13, 1), (41, 29), (401, 127)])
@pytest.mark.parametrize("ties", [False, True])
def test_auroc_and_partial_auroc_match_sklearn(n_neg: int, n_pos: int, ties: bool) -> None:
    rng = np.random.default_rng(n_neg * 7 + n_pos)
    neg, pos = rng.normal(size=n_neg), rng.normal(0.7, size=n_pos)
    if ties:
        neg, pos = np.round(neg), np.round(pos)
    assert auroc(neg, pos) == pytest.approx(_sk(neg, pos), abs=1e-12)
    for max_fpr in (0.1, 0.35, 1.0):
        assert partial_auroc(neg, pos, max_fpr) == pytest.approx(_sk(neg, pos, max_fpr=max_fpr), abs=1e-12)


def test_raw_partial_auroc_is_area_under_clipped_roc() -> None:
    rng = np.random.default_rng(3)
    neg, pos = rng.normal(size=200), rng.normal(1.0, size=150)
    fpr, tpr, _ = roc_curve(np.r_[np.zeros(200), np.ones(150)], np.r_[neg, pos])
    grid = np.linspace(0, 0.1, 20001)
    expected = np.trapezoid(np.interp(grid, fpr, tpr), grid)
    assert partial_auroc(neg, pos, 0.1, standardized=False) == pytest.approx(expected, rel=1e-4)


def test_thresholded_metrics_by_hand() -> None:
    neg = np.arange(10.0)  # 90% TNR -> threshold at the 90th percentile of negatives = 8: positives above 8
    pos = np.array([5.0, 8.5, 9.0, 9.5, 20.0])
    assert tpr_at_tnr(neg, pos) == pytest.approx(0.8)  # 8.5, 9, 9.5, 20 (9 ties a negative: still FPR 0.1)
    assert tnr_at_tpr(neg, pos) == pytest.approx(0.5)  # keeping all 5 positives needs t <= 5: negatives 0..4
    assert tnr_at_tpr(neg, pos, 0.8) == pytest.approx(0.9)  # 4 of 5 positives: t = 8.5, only negative 9 above
    # balanced accuracy max: t = 8.5 gives TPR 0.8, TNR 0.9 -> 0.85
    assert detection_accuracy(neg, pos) == pytest.approx(0.85)
    assert tpr_at_tnr(neg, pos, 0.5) == pytest.approx(1.0)  # threshold 4.5 lets every positive through
    perfect = (np.zeros(4), np.ones(3))
    assert auroc(*perfect) == 1 and tpr_at_tnr(*perfect) == 1 and tnr_at_tpr(*perfect) == 1
    assert detection_accuracy(*perfect) == 1 and partial_auroc(*perfect) == 1


def test_tnr_at_tpr_counts_ties_at_threshold_as_positive_predictions() -> None:
    neg, pos = np.array([0.0, 1.0, 2.0, 3.0]), np.array([2.0, 3.0])
    assert tnr_at_tpr(neg, pos, 1.0) == pytest.approx(0.5)  # t = 2: negatives 2 and 3 are false positives
    assert tpr_at_tnr(neg, pos, 0.75) == pytest.approx(0.5)  # t = 3: one false positive (3), one true (3)


def test_bootstrap_matches_a_plain_resampling_loop() -> None:
    rng = np.random.default_rng(0)
    neg, pos = np.round(rng.normal(size=37), 1), np.round(rng.normal(0.8, size=23), 1)
    out = bootstrap_metrics(neg, pos, n_boot=300, seed=5)
    assert set(out) == {"auroc", "tpr_at_tnr90", "tnr_at_tpr95", "pauc_fpr10", "detection_accuracy"}
    # the same resampling counts (chunks of BOOT_CHUNK), expanded into explicit resamples, scored with sklearn
    draw, w_neg, w_pos = np.random.default_rng(5), [], []
    for start in range(0, 300, BOOT_CHUNK):
        size = min(BOOT_CHUNK, 300 - start)
        w_neg.append(bootstrap_weights(draw, len(neg), size))
        w_pos.append(bootstrap_weights(draw, len(pos), size))
    w_neg, w_pos = np.concatenate(w_neg).astype(int), np.concatenate(w_pos).astype(int)
    assert (w_neg.sum(1) == len(neg)).all() and (w_pos.sum(1) == len(pos)).all()
    aucs = [_sk(np.repeat(neg, a), np.repeat(pos, b)) for a, b in zip(w_neg, w_pos, strict=True)]
    paucs = [_sk(np.repeat(neg, a), np.repeat(pos, b), max_fpr=0.1) for a, b in zip(w_neg, w_pos, strict=True)]
    np.testing.assert_allclose(out["auroc"][1:], np.quantile(aucs, [0.025, 0.975]), atol=1e-12)
    np.testing.assert_allclose(out["pauc_fpr10"][1:], np.quantile(paucs, [0.025, 0.975]), atol=1e-12)
    assert out["auroc"][0] == pytest.approx(_sk(neg, pos))
    for value, low, high in out.values():
        assert low <= value + 1e-9 and value <= high + 1e-9
    assert bootstrap_metrics(neg, pos, n_boot=300, seed=5) == out  # seeded
    no_ci = bootstrap_metrics(neg, pos, n_boot=0)
    assert np.isnan(no_ci["auroc"][1])


def test_metric_input_errors() -> None:
    with pytest.raises(ValueError, match="negatives and positives"):
        auroc(np.array([]), np.array([1.0]))
    with pytest.raises(ValueError, match="NaN"):
        auroc(np.array([np.nan]), np.array([1.0]))
    with pytest.raises(ValueError, match="max_fpr"):
        partial_auroc(np.zeros(2), np.ones(2), max_fpr=0)
