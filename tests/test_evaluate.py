"""The HFC detection protocol: pool, seeded split, fit/eval separation, subsets, transfer sets, tidy rows."""

from __future__ import annotations

import numpy as np
import pytest

from engine.detectors import KD, LID, MAHA, Features, ProtocolSplit, run_protocol
from engine.metrics import auroc

N = 240


def aligned(seed: int = 0) -> dict[str, object]:
    """Aligned clean / noise / plain AE / in-distribution ("HFC-like") AE features of N images."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, N)
    centres = {"a": 3.0 * np.eye(2, 6), "b": 3.0 * np.eye(2, 4)}
    clean = {k: c[labels] + rng.normal(size=(N, c.shape[1])) for k, c in centres.items()}
    preds = labels.copy()
    preds[:12] = 1 - preds[:12]  # 12 misclassified clean images: outside the pool
    success = rng.random(N) < 0.8

    def feats(pooled: dict[str, np.ndarray], predicted: np.ndarray) -> Features:
        return Features(np.eye(2)[predicted] * 3, {k: v.astype(np.float32) for k, v in pooled.items()}, labels=labels)

    flipped = np.where(success, 1 - labels, labels)
    plain = {k: v + np.where(success, 4.0, 0.3)[:, None] for k, v in clean.items()}  # successful AEs: far off
    hfc = {k: c[flipped] + rng.normal(size=v.shape) for (k, c), v in zip(centres.items(), clean.values(), strict=True)}
    noise = {k: v + 0.05 * rng.normal(size=v.shape) for k, v in clean.items()}
    return {
        "clean": feats(clean, preds),
        "noise": feats(noise, preds),
        "plain": feats(plain, flipped),
        "hfc": feats(hfc, flipped),
        "success": success,
        "labels": labels,
    }


def test_split_is_seeded_disjoint_and_only_correct() -> None:
    correct = np.arange(50) % 5 != 0
    split = ProtocolSplit.make(correct, 0.7, seed=3)
    assert set(split.fit) | set(split.eval) == set(split.pool) == set(np.flatnonzero(correct))
    assert not set(split.fit) & set(split.eval) and len(split.fit) == 28
    again = ProtocolSplit.make(correct, 0.7, seed=3)
    np.testing.assert_array_equal(again.fit, split.fit)
    assert not np.array_equal(ProtocolSplit.make(correct, 0.7, seed=4).fit, split.fit)
    with pytest.raises(ValueError, match="fit_fraction"):
        ProtocolSplit.make(correct, 1.0)


def test_protocol_detects_plain_aes_and_misses_in_distribution_ones() -> None:
    d = aligned()
    detectors = [KD(), LID(k=10, batch_size=40), MAHA(magnitude=0.0)]
    result = run_protocol(
        detectors,
        d["clean"],
        d["plain"],
        d["success"],
        noise=d["noise"],
        transfer={"hfc": (d["hfc"], d["success"])},
        n_boot=200,
        seed=1,
    )
    split = result.split
    assert not np.isin(np.arange(12), split.pool).any()
    n_eval = len(split.eval)
    rows = result.to_rows()
    assert {"detector", "metric", "value", "ci_low", "ci_high", "attack", "subset", "n_neg", "n_pos"} <= set(rows[0])
    assert {r["subset"] for r in rows} == {"successful", "failed", "all", "paired", "change"}
    for name in ("kd", "lid", "maha"):
        assert result.value(name) > 0.95  # plain AEs sit far off the clean distribution
        assert result.value(name, attack="hfc") < 0.8  # AEs inside the class distribution are missed
        scores = result.scores[name]
        neg = scores.negatives.reshape(-1)
        assert scores.negatives.shape == (n_eval, 2)  # clean + noise of each evaluation image
        succ = scores.positives("attack")
        assert len(succ) == d["success"][split.eval].sum()
        assert result.value(name) == pytest.approx(auroc(neg, succ))
        row = next(r for r in rows if r["detector"] == name and r["metric"] == "auroc" and r["subset"] == "all")
        assert row["n_pos"] == n_eval and row["ci_low"] <= row["value"] <= row["ci_high"]
        both = scores.success["attack"] & scores.success["hfc"]  # the same images for both sets
        plain = auroc(neg, scores.adversarial["attack"][both])
        hfc = auroc(neg, scores.adversarial["hfc"][both])
        assert result.value(name, subset="paired") == pytest.approx(plain)
        assert result.value(name, attack="hfc", subset="paired") == pytest.approx(hfc)
        assert result.value(name, attack="hfc", subset="change") == pytest.approx(hfc - plain)
        change = next(r for r in rows if r["detector"] == name and r["metric"] == "auroc" and r["subset"] == "change")
        assert change["ci_high"] < 0 and change["n_pos"] == both.sum()  # HFC-like AEs: detection clearly drops
    assert result.attack_success_rate["attack"] == pytest.approx(d["success"][split.pool].mean())
    np.testing.assert_array_equal(result.scores["kd"].index, split.eval)
    failed = result.scores["kd"].positives("attack", "failed")
    assert len(failed) == (~d["success"][split.eval]).sum()


def test_protocol_fits_on_the_fit_split_only() -> None:
    d = aligned()
    result = run_protocol([KD()], d["clean"], d["plain"], d["success"], n_boot=0)
    det = KD().fit(
        None, d["clean"].subset(result.split.fit), d["plain"].subset(result.split.fit[d["success"][result.split.fit]])
    )
    np.testing.assert_allclose(result.scores["kd"].negatives[:, 0], det.score(d["clean"].subset(result.split.eval)))


def test_protocol_input_errors() -> None:
    d = aligned()
    with pytest.raises(ValueError, match="align"):
        run_protocol([KD()], d["clean"], d["plain"].subset(np.arange(10)), d["success"])
    with pytest.raises(ValueError, match="succeeded on none"):
        run_protocol([KD()], d["clean"], d["plain"], np.zeros(N, bool))
    unlabeled = Features(d["clean"].logits, d["clean"].pooled)
    with pytest.raises(ValueError, match="labels"):
        run_protocol([KD()], unlabeled, d["plain"], d["success"])
