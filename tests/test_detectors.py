"""Detectors: separation of easy synthetic cases, agreement with independent references, save/load, errors."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from sklearn.covariance import EmpiricalCovariance
from sklearn.neighbors import KernelDensity
from sklearn.svm import SVC
from torch import nn

from engine import reference
from engine.detectors import (
    BU,
    DNN,
    DNR,
    KD,
    LID,
    MAHA,
    SVM,
    Detector,
    FeatureCache,
    Features,
    NotFittedError,
    SafetyNet,
)
from engine.detectors import maha as maha_module
from engine.detectors.bu import mc_dropout_logits
from engine.detectors.svm import RBFSVM
from engine.errors import UserError
from engine.metrics import auroc
from engine.models import FeatureExtractor, input_layout
from engine.models.memory import bytes_per_image, memory_budget

DIMS = {"a": 6, "b": 5, "c": 4}


def synth(n: int, shift: float, seed: int, raw: bool = False) -> Features:
    """Two-class features; ``shift`` moves every layer off the clean distribution (and flips the prediction)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    pooled, raw_maps = {}, {}
    for j, (name, d) in enumerate(DIMS.items()):
        centres = np.stack([np.zeros(d), np.full(d, 2.0)])
        f = centres[labels] + rng.normal(size=(n, d)) + shift * (1 + j) * np.r_[1.0, -1.0, np.zeros(d - 2)]
        pooled[name] = f.astype(np.float32)
        if raw:
            maps = f[:, :, None, None] + 0.3 * rng.normal(size=(n, d, 3, 3))
            raw_maps[name] = torch.tensor(maps, dtype=torch.float32)
            pooled[name] = raw_maps[name].mean((2, 3)).numpy()
    preds = labels if shift == 0 else 1 - labels
    logits = np.eye(2)[preds] * 4.0
    return Features(logits=logits, pooled=pooled, raw=raw_maps, labels=labels)


def sets(raw: bool = False) -> dict[str, Features]:
    return {
        "clean": synth(160, 0.0, 1, raw),
        "noise": synth(60, 0.0, 2, raw),
        "adv": synth(120, 2.5, 3, raw),
        "clean_test": synth(80, 0.0, 4, raw),
        "adv_test": synth(80, 2.5, 5, raw),
    }


FEATURE_DETECTORS = [
    lambda: KD(),
    lambda: KD(layers=["a", "c"]),
    lambda: LID(k=10, batch_size=50),
    lambda: MAHA(magnitude=0.0),
    lambda: SVM(layers=["b", "c"]),
    lambda: SafetyNet(),
    lambda: DNR(max_train=120),
]


@pytest.mark.parametrize("make", FEATURE_DETECTORS)
def test_feature_detectors_separate_and_round_trip(make, tmp_path) -> None:
    s = sets()
    det = make().fit(None, s["clean"], s["adv"], s["noise"])
    clean, adv = det.score(s["clean_test"]), det.score(s["adv_test"])
    assert clean.shape == (80,) and np.isfinite(clean).all()
    assert auroc(clean, adv) > 0.9
    assert np.median(clean) < np.median(adv)
    n_cols = 1 if isinstance(det, (SVM, DNR)) else len(det.layers_)  # SVM/DNR: one score from all layers
    assert det.layer_scores(s["adv_test"]).shape == (80, n_cols)
    loaded = Detector.load(det.save(tmp_path / "det"))
    assert type(loaded) is type(det) and loaded.get_params() == det.get_params()
    np.testing.assert_allclose(loaded.score(s["adv_test"]), det.score(s["adv_test"]), rtol=1e-10, atol=1e-10)


def test_a_fit_reads_its_pooled_layers_or_dnn_its_raw_maps() -> None:
    pooled, raw = ["p", "a"], ["a", "b"]
    assert KD().reads(pooled, raw) == (("p", "a"), ())  # by default every pooled layer: conservative
    assert DNN().reads(pooled, raw) == ((), ("a", "b"))
    assert DNN(layers=["b"]).reads(pooled, raw) == ((), ("b",))


def test_dnn_separates_raw_maps_and_round_trips(tmp_path) -> None:
    s = sets(raw=True)
    options = dict(layers=["a", "b"], width=0.1, epochs=6, batch_size=128, lr=3e-3, seed=3)
    det = DNN(**options).fit(None, s["clean"], s["adv"], s["noise"])
    assert auroc(det.score(s["clean_test"]), det.score(s["adv_test"])) > 0.9
    again = DNN(**options).fit(None, s["clean"], s["adv"], s["noise"])
    np.testing.assert_array_equal(again.score(s["adv_test"]), det.score(s["adv_test"]))  # seeded
    loaded = Detector.load(det.save(tmp_path / "dnn"))
    np.testing.assert_allclose(loaded.score(s["adv_test"]), det.score(s["adv_test"]), rtol=1e-6)
    with pytest.raises(ValueError, match="raw_layers"):
        DNN().fit(None, synth(30, 0, 1), synth(30, 2, 2))


def test_kd_equals_sklearn_kde_under_predicted_class_and_compat_bandwidth() -> None:
    s = sets()
    det = KD(layers="b").fit(None, s["clean"], s["adv"])
    h = float(det.bandwidths_[0])
    assert h != 1.0
    x = s["adv_test"]
    expected = np.empty(len(x))
    for c in (0, 1):
        ref = s["clean"].pooled["b"][s["clean"].labels == c].astype(np.float64)
        rows = x.preds == c
        expected[rows] = -KernelDensity(bandwidth=h).fit(ref).score_samples(x.pooled["b"][rows].astype(np.float64))
    np.testing.assert_allclose(det.layer_scores(x)[:, 0], expected, rtol=1e-4)
    compat = KD(layers="b", reference_compat=True).fit(None, s["clean"], s["adv"])
    assert compat.bandwidths_.tolist() == [1.0]
    assert KD(layers="b", bandwidth=0.7).fit(None, s["clean"], s["adv"]).bandwidths_.tolist() == [0.7]


def test_lid_self_exclusion_and_reference_compat() -> None:
    s = sets()
    det = LID(layers="a", k=10, batch_size=50).fit(None, s["clean"], s["adv"])
    compat = LID(layers="a", k=10, batch_size=50, reference_compat=True).fit(None, s["clean"], s["adv"])
    x = s["adv_test"].pooled["a"]
    ref0 = torch.from_numpy(det.refs_[0][0]).double()
    rows = np.arange(len(x)) % len(det.refs_[0]) == 0
    expected = reference.lid(torch.from_numpy(x[rows]).double(), ref0, k=10).numpy()
    np.testing.assert_allclose(det.layer_scores(s["adv_test"])[rows, 0], expected, rtol=1e-4)
    # the compat quirk drops a true neighbour for queries outside the reference batch: the estimates differ
    dist = reference.knn_distances(torch.from_numpy(x[rows]).double(), ref0, 11)[:, 1:]
    np.testing.assert_allclose(
        compat.layer_scores(s["adv_test"])[rows, 0], reference.lid_from_distances(dist).numpy(), rtol=1e-4
    )
    assert not np.allclose(compat.layer_scores(s["adv_test"]), det.layer_scores(s["adv_test"]))
    # clean fit examples are scored against their own batch without themselves: both conventions agree there
    feats = s["clean"].pooled["a"]
    batch = det._batches(len(feats))[0]
    own = reference.lid(torch.from_numpy(feats[batch]).double(), torch.from_numpy(feats[batch]).double(), 10, True)
    np.testing.assert_allclose(det._lid(feats[batch], feats[batch], member=True), own.numpy(), rtol=1e-4)
    np.testing.assert_allclose(compat._lid(feats[batch], feats[batch], member=True), own.numpy(), rtol=1e-4)


def test_maha_matches_sklearn_tied_covariance() -> None:
    s = sets()
    det = MAHA(layers=["a", "c"], magnitude=0.0).fit(None, s["clean"], s["adv"])
    for j, name in enumerate(["a", "c"]):
        f, y = s["clean"].pooled[name].astype(np.float64), s["clean"].labels
        means = np.stack([f[y == c].mean(0) for c in (0, 1)])
        cov = EmpiricalCovariance(assume_centered=True).fit(f - means[y])
        x = s["adv_test"].pooled[name].astype(np.float64)
        expected = 0.5 * np.stack([cov.mahalanobis(x - m) for m in means], 1).min(1)
        np.testing.assert_allclose(det.layer_scores(s["adv_test"])[:, j], expected, rtol=1e-4)


def test_rbf_svm_decision_equals_sklearn() -> None:
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(41, 3)), rng.integers(0, 2, 41)
    ours = RBFSVM(C=2.0).fit(X, y)
    svc = SVC(kernel="rbf", C=2.0, gamma="scale", class_weight="balanced").fit(X, y)
    Xt = rng.normal(size=(7, 3))
    np.testing.assert_allclose(ours.decision(Xt), svc.decision_function(Xt), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(ours.decision(Xt[:1]), svc.decision_function(Xt[:1]), rtol=1e-8, atol=1e-10)
    for d, offset in ((1, 0.0), (300, 50.0)):  # d = 1; wide features far from the origin (the expansion's centring)
        X, Xt = rng.normal(offset, 1.0, size=(60, d)), rng.normal(offset, 1.0, size=(5, d)).astype(np.float32)
        ours = RBFSVM().fit(X, y := rng.integers(0, 2, 60))
        svc = SVC(kernel="rbf", gamma="scale", class_weight="balanced").fit(X, y)
        np.testing.assert_allclose(ours.decision(Xt), svc.decision_function(Xt.astype(np.float64)), rtol=1e-7,
                                   atol=1e-9)  # fmt: skip
    with pytest.raises(UserError, match="X must have 300 columns"):
        ours.decision(Xt[:, :3])


def test_dnr_rejects_about_ten_percent_of_clean() -> None:
    s = sets()
    det = DNR(layers=["a", "b", "c"], max_train=160).fit(None, s["clean"], s["adv"])
    assert 0.05 <= det.reject(s["clean"]).mean() <= 0.2 or det.reject(s["clean"]).mean() < 0.05
    assert det.reject(s["adv_test"]).mean() > 0.8


# -- errors -------------------------------------------------------------------------------------------------
def test_unfitted_and_mismatched_dims_raise() -> None:
    s = sets()
    with pytest.raises(NotFittedError, match="not fitted"):
        KD().score(s["clean"])
    with pytest.raises(NotFittedError):
        KD().save("/tmp/never")
    det = MAHA(magnitude=0.0).fit(None, s["clean"], s["adv"])
    bad = Features(logits=s["clean"].logits, pooled={**s["clean"].pooled, "b": np.zeros((160, 3), np.float32)})
    with pytest.raises(ValueError, match="'b' has 3 channels but the detector was fitted on 5"):
        det.score(bad)
    with pytest.raises(KeyError, match="not extracted"):
        KD(layers="zzz").fit(None, s["clean"], s["adv"])
    with pytest.raises(ValueError, match="not Features"):
        KD().fit(None, torch.zeros(4, 1, 8, 8), s["adv"])
    with pytest.raises(ValueError, match="magnitude=0.0"):
        MAHA().fit(None, s["clean"], s["adv"])
    for bad_ctor in (lambda: KD(bandwidth=0), lambda: LID(k=20, batch_size=20), lambda: BU(passes=1)):
        with pytest.raises(ValueError):
            bad_ctor()
    with pytest.raises(ValueError, match="logits"):
        Features(logits=np.zeros(3), pooled={})
    with pytest.raises(UserError, match="no config.json"):
        Detector.load("/nonexistent/detector")


# -- detectors that run a model --------------------------------------------------------------------------------
class Tiny(nn.Module):
    """conv - relu - conv - relu - GAP - dropout - fc: brighter inputs give larger features."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.relu1 = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(4, 6, 3, padding=1), nn.ReLU()
        self.dropout, self.fc = nn.Dropout(0.5), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(self.dropout(h.mean((2, 3))))


def images(n: int, offset: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.1 * torch.rand(n, 1, 8, 8, generator=g) + offset).clamp(0, 1)


@pytest.fixture(scope="module")
def cache() -> FeatureCache:
    model = Tiny().eval()
    return FeatureCache(model, layers=["relu1", "relu2"], raw_layers=["relu1"], batch_size=32)


def test_feature_cache_one_pass_per_batch(cache: FeatureCache) -> None:
    calls = []
    input_layout(cache.model, (1, 8, 8))  # the layout and the batch size are decided once per shape, on one image
    cache.batch_for((1, 8, 8))
    handle = cache.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        feats = cache.extract(images(70, 0.2, 0), labels=np.zeros(70))
    finally:
        handle.remove()
    assert len(calls) == 3  # ceil(70 / 32) passes for all layers, pooled and raw
    assert feats.layer_names == ["relu1", "relu2"] and feats.raw["relu1"].shape == (70, 4, 8, 8)
    logits, direct = FeatureExtractor(cache.model, ["relu2"], pooled=True)(images(70, 0.2, 0)[:5])
    np.testing.assert_allclose(feats.pooled["relu2"][:5], direct["relu2"].detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(feats.logits[:5], logits.detach().numpy(), rtol=1e-6)
    one = cache.extract(images(1, 0.2, 0))
    assert len(one) == 1 and one.labels is None


def test_feature_cache_batches_fit_the_memory_budget(monkeypatch) -> None:
    model = Tiny().eval()
    wide = FeatureCache(model, layers=["relu1", "relu2"], raw_layers=["relu1"], batch_size=32)
    x = images(20, 0.2, 1)
    everything = wide.extract(x)
    logits, feats = wide.extractor(x[:1])
    assert feats["relu1"].dim() == 4 and feats["relu2"].dim() == 2  # only raw layers keep their maps in a pass
    per_image = logits.nbytes + sum(f.nbytes for f in feats.values()) + bytes_per_image(model, x.shape[1:], False)
    monkeypatch.setenv("HFC_ENGINE_MEMORY_GB", str(6.5 * per_image / 2**30))  # room for 6 images' maps
    narrow = FeatureCache(model, layers=["relu1", "relu2"], raw_layers=["relu1"], batch_size=32)
    backward = per_image - bytes_per_image(model, x.shape[1:], False) + bytes_per_image(model, x.shape[1:], True)
    assert narrow.batch_for(x.shape[1:]) == 6
    assert narrow.batch_for(x.shape[1:], backward=True) == memory_budget() // backward  # plus what backward keeps
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        batched = narrow.extract(x)
    finally:
        handle.remove()
    assert len(calls) == 4  # ceil(20 / 6)
    np.testing.assert_allclose(batched.pooled["relu2"], everything.pooled["relu2"], rtol=1e-6)
    torch.testing.assert_close(batched.raw["relu1"], everything.raw["relu1"])


def test_bu_separates_shifted_inputs_and_compat(cache: FeatureCache) -> None:
    clean, adv = cache.extract(images(60, 0.0, 1)), cache.extract(images(60, 0.8, 2))
    det = BU(passes=20).fit(cache, clean, adv)
    test_clean, test_adv = cache.extract(images(30, 0.0, 3)), cache.extract(images(30, 0.8, 4))
    assert auroc(det.score(test_clean), det.score(test_adv)) > 0.9
    logits = mc_dropout_logits(cache.model, test_adv.images, 20, det.seed).double()
    expected = torch.softmax(logits, -1).var(0, unbiased=False).mean(1).numpy()
    np.testing.assert_allclose(det.layer_scores(test_adv)[:, 0], expected, rtol=1e-5)
    compat = BU(passes=20, reference_compat=True).fit(cache, clean, adv)
    np.testing.assert_allclose(compat.layer_scores(test_adv)[:, 0], logits[:, :, 0].std(0, unbiased=False), rtol=1e-5)
    assert not cache.model.dropout.training  # MC-dropout switched off again
    # the T passes share the backbone: with p = 0 every pass must reproduce the plain forward, row for row
    model = Tiny().eval()
    model.dropout.p = 0.0
    x = images(5, 0.5, 9)
    np.testing.assert_allclose(mc_dropout_logits(model, x, 3, 0), model(x).detach()[None].expand(3, 5, 2), rtol=1e-6)
    with pytest.raises(ValueError, match="dropout"):
        BU().fit(FeatureCache(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), layers=["0"]), clean, adv)


def test_maha_reuses_preprocessed_rows_of_a_layer_another_arm_read() -> None:
    model = Tiny().eval()
    wide = FeatureCache(model, layers=["relu1", "relu2"])
    narrow = FeatureCache(model, layers=["relu1"])
    clean, adv = wide.extract(images(40, 0.1, 5)), wide.extract(images(40, 0.7, 6))
    backward = []
    model.conv1.register_full_backward_hook(lambda *a: backward.append(1))
    MAHA(layers=["relu1"], seed=1).fit(narrow, narrow.extract(clean.images), narrow.extract(adv.images))
    first = len(backward)
    both = MAHA(layers=["relu1", "relu2"], seed=1).fit(wide, clean, adv)
    assert first > 0 and len(backward) == 2 * first  # only relu2's rows were computed: relu1's were reused
    maha_module._DONE.clear()  # the same detector from scratch gives the same scores
    fresh = MAHA(layers=["relu1", "relu2"], seed=1).fit(wide, clean, adv)
    assert fresh.magnitude_ == both.magnitude_
    np.testing.assert_allclose(fresh.score(adv), both.score(adv), rtol=1e-6)


def test_maha_preprocessing_sign_and_magnitude_selection(cache: FeatureCache, tmp_path) -> None:
    clean, adv = cache.extract(images(60, 0.1, 5)), cache.extract(images(60, 0.7, 6))
    det = MAHA(seed=1).fit(cache, clean, adv)
    assert det.magnitude_ in MAHA().magnitudes
    assert auroc(det.score(cache.extract(images(30, 0.1, 7))), det.score(cache.extract(images(30, 0.7, 8)))) > 0.9
    m = 0.001  # small enough not to overshoot the closest mean on this tiny model
    base = det._scores_at(clean, 0.0)
    towards = MAHA(magnitude=m).fit(cache, clean, adv)._scores_at(clean, m)
    away = MAHA(magnitude=m, reference_compat=True).fit(cache, clean, adv)._scores_at(clean, m)
    assert (towards < base).mean() > 0.9  # the correct step reduces the distance to the closest class mean
    assert (away > base).mean() > 0.9  # the HFC code's sign increases it
    loaded = Detector.load(det.save(tmp_path / "maha"))
    with pytest.raises(ValueError, match="attach"):
        loaded.score(clean) if loaded.magnitude_ else loaded._preprocessed_features(clean, [0.01])
    np.testing.assert_allclose(loaded.attach(cache).score(adv), det.score(adv), rtol=1e-6)


def test_a_feature_cache_takes_its_hooks_with_it() -> None:
    model = Tiny().eval()
    hooks = lambda: sum(len(m._forward_hooks) for m in model.modules())  # noqa: E731
    cache = FeatureCache(model, layers=["relu1", "relu2"], raw_layers=["relu1"])
    assert hooks() == 2
    del cache
    gc.collect()
    assert hooks() == 0  # a cell's raw-map cache must not leave no-op hooks on the run's model

