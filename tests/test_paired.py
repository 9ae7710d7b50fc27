"""The image bootstrap and paired changes (engine.metrics.paired) against hand computations and a plain loop."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from engine.metrics import auroc, tpr_at_tnr
from engine.metrics.paired import image_bootstrap


def small_case() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    negatives = np.array([[0.1, 0.2], [0.3, 0.0], [0.5, 0.4], [0.2, 0.6], [0.35, 0.15]])
    plain = np.array([0.9, 0.8, np.nan, 0.7, 0.45])  # image 2: the plain attack failed
    hfc = np.array([0.25, np.nan, 0.3, 0.65, 0.1])  # image 1: HFC failed
    return negatives, {"plain": plain, "hfc": hfc}


def test_point_estimates_and_paired_change_by_hand():
    negatives, positives = small_case()
    out = image_bootstrap(negatives, positives, pairs=[("plain", "hfc")], n_boot=0)
    neg = negatives.reshape(-1)
    # plain on its own successful images 0, 1, 3, 4; HFC on 0, 2, 3, 4; both on 0, 3, 4
    assert out.sets["plain"]["auroc"][0] == pytest.approx(auroc(neg, [0.9, 0.8, 0.7, 0.45]))
    assert out.sets["hfc"]["auroc"][0] == pytest.approx(auroc(neg, [0.25, 0.3, 0.65, 0.1]))
    # by hand: plain on (0, 3, 4) = [0.9, 0.7, 0.45] vs the 10 negatives: 10 + 10 + 8 (0.45 loses to 0.5, 0.6)
    assert out.paired[("plain", "hfc")]["plain"]["auroc"][0] == pytest.approx(28 / 30)
    # HFC on (0, 3, 4) = [0.25, 0.65, 0.1]: 0.25 beats 5 of 10, 0.65 beats 10, 0.1 beats 1 and ties 1 (counts 1/2)
    assert out.paired[("plain", "hfc")]["hfc"]["auroc"][0] == pytest.approx(16.5 / 30)
    assert out.paired[("plain", "hfc")]["change"]["auroc"][0] == pytest.approx(16.5 / 30 - 28 / 30)
    assert out.n_positive == {"plain": 4, "hfc": 4} and out.n_paired == {("plain", "hfc"): 3}
    tpr = out.paired[("plain", "hfc")]["plain"]["tpr_at_tnr90"][0]
    assert tpr == pytest.approx(tpr_at_tnr(neg, [0.9, 0.7, 0.45]))
    assert np.isnan(out.sets["plain"]["auroc"][1])  # n_boot=0: no interval


def test_an_images_copies_move_together():
    """Duplicated negatives (clean == noise) resampled by image give exactly the interval of one copy per image;
    resampled as independent samples they would give a narrower one."""
    rng = np.random.default_rng(0)
    one = rng.normal(size=(60, 1))
    positives = {"a": rng.normal(1.0, 1.0, 60)}
    single = image_bootstrap(one, positives, n_boot=500, seed=3).sets["a"]["auroc"]
    double = image_bootstrap(np.repeat(one, 2, axis=1), positives, n_boot=500, seed=3).sets["a"]["auroc"]
    assert double == pytest.approx(single)


def test_intervals_match_a_plain_resampling_loop():
    rng = np.random.default_rng(1)
    n = 80
    negatives = rng.normal(size=(n, 2))
    plain = np.where(rng.random(n) < 0.8, rng.normal(1.5, 1.0, n), np.nan)
    hfc = np.where(rng.random(n) < 0.7, rng.normal(0.3, 1.0, n), np.nan)
    out = image_bootstrap(negatives, {"plain": plain, "hfc": hfc}, pairs=[("plain", "hfc")], n_boot=1000, seed=5)
    both = np.isfinite(plain) & np.isfinite(hfc)
    draws = []
    loop_rng = np.random.default_rng(11)
    for _ in range(1000):  # resample images; an image brings both negatives and its AEs
        idx = loop_rng.integers(0, n, n)
        neg = negatives[idx].reshape(-1)
        keep = both[idx]
        if not keep.any():
            continue
        auc = [mannwhitneyu(s[idx][keep], neg).statistic / (keep.sum() * len(neg)) for s in (plain, hfc)]
        draws.append(auc[1] - auc[0])
    low, high = np.quantile(draws, [0.025, 0.975])
    change = out.paired[("plain", "hfc")]["change"]["auroc"]
    neg = negatives.reshape(-1)
    assert change[0] == pytest.approx(auroc(neg, hfc[both]) - auroc(neg, plain[both]))
    assert change[1] == pytest.approx(low, abs=0.04) and change[2] == pytest.approx(high, abs=0.04)
    assert change[2] < 0  # HFC-like scores sit much closer to the negatives


def test_bad_input_names_the_argument():
    negatives, positives = small_case()
    with pytest.raises(ValueError, match="negatives"):
        image_bootstrap(negatives[:, 0], positives)
    with pytest.raises(ValueError, match=r"positives\['plain'\]"):
        image_bootstrap(negatives, {"plain": positives["plain"][:3]})
    with pytest.raises(ValueError, match="n_boot"):
        image_bootstrap(negatives, positives, n_boot=-1)
