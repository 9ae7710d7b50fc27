"""RBF-SVM detectors: SVM (continuous features, the HFC code's variant), SafetyNet (Lu et al. 2017, quantised
ReLU codes) and DNR (Sotgiu et al. 2020, deep neural rejection).

SVMs are trained by scikit-learn; their decision functions are evaluated from the stored support vectors (squared
Euclidean distances in one matrix product), so a saved detector is plain arrays.
"""

from __future__ import annotations

import logging

import numpy as np

from engine.detectors.base import Cost, Detector, Requirements, class_labels
from engine.detectors.features import Features
from engine.errors import UserError

log = logging.getLogger("engine.detectors")


class RBFSVM:
    """Binary RBF-SVC: ``decision(x) = sum_i a_i exp(-gamma ||x - s_i||^2) + b`` (> 0 means the positive class)."""

    def __init__(self, C: float = 1.0, gamma: float | str = "scale") -> None:
        self.C, self.gamma = C, gamma
        self.support = self.coef = None
        self.intercept, self.gamma_ = 0.0, None

    def fit(self, X: np.ndarray, y: np.ndarray) -> RBFSVM:
        from sklearn.svm import SVC

        if len(np.unique(y)) != 2:
            raise UserError(f"an SVM needs both classes in its training labels, got {np.unique(y).tolist()}")
        svc = SVC(kernel="rbf", C=self.C, gamma=self.gamma, class_weight="balanced").fit(X, y)
        self.support = np.ascontiguousarray(svc.support_vectors_, dtype=np.float64)
        self.coef = svc.dual_coef_[0].astype(np.float64)
        self.intercept, self.gamma_ = float(svc.intercept_[0]), float(svc._gamma)
        return self

    def decision(self, X: np.ndarray) -> np.ndarray:
        """(N,) decision values; squared distances by the expansion ||x||^2 - 2 x.s + ||s||^2 about the support
        vectors' mean (N x S x d work: a 4096-d layer's SVMs cost milliseconds, not a d x d factorisation each)."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.support.shape[1]:
            raise UserError(f"X must have {self.support.shape[1]} columns (the SVM's features), got {X.shape}")
        centre = self.support.mean(0)
        x, s = X - centre, self.support - centre
        sq = (x * x).sum(1)[:, None] - 2.0 * x @ s.T + (s * s).sum(1)[None]
        return np.exp(-self.gamma_ * np.maximum(sq, 0.0)) @ self.coef + self.intercept

    def state(self, prefix: str) -> dict[str, np.ndarray]:
        params = np.array([self.intercept, self.gamma_])
        return {f"{prefix}support": self.support, f"{prefix}coef": self.coef, f"{prefix}params": params}

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], prefix: str) -> RBFSVM:
        svm = cls()
        svm.support, svm.coef = arrays[f"{prefix}support"], arrays[f"{prefix}coef"]
        svm.intercept, svm.gamma_ = (float(v) for v in arrays[f"{prefix}params"])
        return svm


class SVM(Detector):
    """RBF-SVC on the concatenated (standardised) pooled features of ``layers`` (default: the last layer).

    ``levels`` > 1 quantises every channel into that many levels at per-channel quantiles of the clean fit
    features (SafetyNet's discrete ReLU codes) before the SVM.
    """

    name = "svm"
    cost = Cost(seconds_per_image=5e-4)
    combine = "mean"  # one column: the SVM decision value itself

    def __init__(
        self,
        layers: list[str] | str | None = None,
        levels: int | None = None,
        C: float = 1.0,
        gamma: float | str = "scale",
        seed: int = 0,
    ) -> None:
        super().__init__(layers, False, seed)
        if levels is not None and levels < 2:
            raise UserError(f"levels must be >= 2 (or None for continuous features), got {levels}")
        self.levels, self.C, self.gamma = levels, C, gamma
        self.shift_ = self.scale_ = self.svm_ = None

    def _inputs(self, x: Features) -> np.ndarray:
        return np.concatenate([x.layer(name, self.dims_[name]) for name in self.layers_], axis=1).astype(np.float64)

    def _transform(self, X: np.ndarray) -> np.ndarray:
        if self.levels is None:
            return (X - self.shift_) / self.scale_
        # shift_ holds the (levels-1, d) thresholds: code = number of thresholds exceeded, scaled to [0, 1]
        return (X[:, None, :] > self.shift_[None]).sum(1) / (self.levels - 1)

    def _fit(self, clean, adversarial, noise, train):
        X_clean = self._inputs(clean)
        if self.levels is None:
            self.shift_, self.scale_ = X_clean.mean(0), X_clean.std(0)
            self.scale_[self.scale_ == 0] = 1.0
        else:
            self.shift_ = np.quantile(X_clean, np.arange(1, self.levels) / self.levels, axis=0)
            self.scale_ = np.ones(X_clean.shape[1])
        neg = [X_clean] + ([] if noise is None else [self._inputs(noise)])
        X = self._transform(np.concatenate(neg + [self._inputs(adversarial)]))
        y = np.r_[np.zeros(sum(len(n) for n in neg)), np.ones(len(adversarial))]
        self.svm_ = RBFSVM(self.C, self.gamma).fit(X, y)
        return self._fit_scores(clean, adversarial, noise)

    def _layer_scores(self, x: Features) -> np.ndarray:
        return self.svm_.decision(self._transform(self._inputs(x)))[:, None]

    def _state(self):
        return {"shift": self.shift_, "scale": self.scale_, **self.svm_.state("svm_")}

    def _set_state(self, arrays):
        self.shift_, self.scale_ = arrays["shift"], arrays["scale"]
        self.svm_ = RBFSVM.from_state(arrays, "svm_")


class SafetyNet(SVM):
    """SafetyNet: RBF-SVM on quantised late-layer ReLU codes (``levels`` quantile levels per channel)."""

    name = "safetynet"

    def __init__(
        self,
        layers: list[str] | str | None = None,
        levels: int | None = 4,
        C: float = 1.0,
        gamma: float | str = "scale",
        seed: int = 0,
    ) -> None:
        super().__init__(layers, levels, C, gamma, seed)


CV_GRID = {"C": (0.1, 1.0, 10.0), "gamma": (0.03, 0.3, 3.0)}  # DNR's "cv" hyper-parameters (gamma x sklearn "scale")


class DNR(Detector):
    """Deep neural rejection: one-vs-all RBF-SVMs per layer (default: the last 3), combined by one-vs-all RBF-SVMs
    trained on their cross-validated class scores. Trained on clean labelled data only (``train``, at most
    ``max_train`` examples, stratified). Score = -max_c combined score; ``theta_`` rejects ``reject_rate`` of the
    (cross-validated) clean training data (:meth:`reject`).
    """

    name = "dnr"
    requires = Requirements(training_features=True)
    cost = Cost(seconds_per_image=2e-3)
    combine = "mean"

    def __init__(
        self,
        layers: list[str] | str | None = None,
        C: float | str = 1.0,
        gamma: float | str = "scale",
        reject_rate: float = 0.1,
        cv_folds: int = 3,
        max_train: int = 1000,
        seed: int = 0,
    ) -> None:
        super().__init__(layers, False, seed)
        if not 0 < reject_rate < 1:
            raise UserError(f"reject_rate must be in (0, 1), got {reject_rate}")
        if cv_folds < 2:
            raise UserError(f"cv_folds must be >= 2, got {cv_folds}")
        self.C, self.gamma, self.reject_rate = C, gamma, float(reject_rate)
        self.cv_folds, self.max_train = int(cv_folds), int(max_train)
        self.classes_ = self.shift_ = self.scale_ = None
        self.layer_svms_: list[list[RBFSVM]] = []
        self.combiner_svms_: list[RBFSVM] = []
        self.theta_ = None

    def _default_layers(self, available):
        return available[-3:]

    def _standardised(self, x: Features, j: int) -> np.ndarray:
        name = self.layers_[j]
        return (x.layer(name, self.dims_[name]).astype(np.float64) - self.shift_[j]) / self.scale_[j]

    def _hyper(self, X: np.ndarray, y: np.ndarray) -> tuple[float | str, float | str]:
        """(C, gamma) for SVMs on ``X``: as given, or, for "cv", the best of :data:`CV_GRID` by cross-validated
        accuracy on the clean training data (as Sotgiu et al. tune theirs); gamma values scale sklearn's "scale"."""
        if self.C != "cv" and self.gamma != "cv":
            return self.C, self.gamma
        from sklearn.model_selection import GridSearchCV
        from sklearn.svm import SVC

        scale = 1.0 / (X.shape[1] * max(float(X.var()), 1e-12))
        grid = {
            "C": list(CV_GRID["C"]) if self.C == "cv" else [self.C],
            "gamma": [g * scale for g in CV_GRID["gamma"]] if self.gamma == "cv" else [self.gamma],
        }
        search = GridSearchCV(SVC(kernel="rbf", class_weight="balanced"), grid, cv=self.cv_folds).fit(X, y)
        return search.best_params_["C"], search.best_params_["gamma"]

    def _ova(self, X: np.ndarray, y: np.ndarray) -> list[RBFSVM]:
        C, gamma = self._hyper(X, y)
        return [RBFSVM(C, gamma).fit(X, (y == c).astype(int)) for c in self.classes_]

    @staticmethod
    def _decisions(svms: list[RBFSVM], X: np.ndarray) -> np.ndarray:
        return np.stack([s.decision(X) for s in svms], axis=1)

    def _fit(self, clean, adversarial, noise, train):
        from sklearn.model_selection import StratifiedKFold, train_test_split

        labels = class_labels(train)
        classes, counts = np.unique(labels, return_counts=True)
        if (counts < self.cv_folds).any():  # a class in fewer than cv_folds examples cannot be cross-validated
            rare = {int(c): int(n) for c, n in zip(classes, counts, strict=True) if n < self.cv_folds}
            log.warning("dnr: fitted without classes %s (training examples per class; < cv_folds=%d)", rare,
                        self.cv_folds)  # fmt: skip
            keep = np.flatnonzero(~np.isin(labels, list(rare)))
            train, labels = train.subset(keep), labels[keep]
        if len(train) > self.max_train:
            keep, _ = train_test_split(
                np.arange(len(train)), train_size=self.max_train, stratify=labels, random_state=self.seed
            )
            train, labels = train.subset(np.sort(keep)), labels[np.sort(keep)]
        self.classes_ = np.unique(labels)
        if len(self.classes_) < 2:
            raise UserError(
                f"DNR needs training examples of at least 2 classes with >= cv_folds={self.cv_folds} each, got "
                f"classes {classes.tolist()} with counts {counts.tolist()}"
            )
        raw = [train.layer(name, self.dims_[name]).astype(np.float64) for name in self.layers_]
        self.shift_ = [r.mean(0) for r in raw]
        self.scale_ = [np.where(r.std(0) > 0, r.std(0), 1.0) for r in raw]
        X = [self._standardised(train, j) for j in range(len(raw))]
        folds = StratifiedKFold(self.cv_folds, shuffle=True, random_state=self.seed).split(X[0], labels)
        Z = np.zeros((len(labels), len(raw) * len(self.classes_)))
        for fit_idx, held in folds:
            Z[held] = np.concatenate(
                [self._decisions(self._ova(Xj[fit_idx], labels[fit_idx]), Xj[held]) for Xj in X], axis=1
            )
        self.combiner_svms_ = self._ova(Z, labels)
        self.layer_svms_ = [self._ova(Xj, labels) for Xj in X]
        self.theta_ = float(np.quantile(self._decisions(self.combiner_svms_, Z).max(1), self.reject_rate))
        return self._fit_scores(clean, adversarial, noise)

    def _combined(self, x: Features) -> np.ndarray:
        Z = np.concatenate([self._decisions(s, self._standardised(x, j)) for j, s in enumerate(self.layer_svms_)], 1)
        return self._decisions(self.combiner_svms_, Z)

    def _layer_scores(self, x: Features) -> np.ndarray:
        return -self._combined(x).max(1)[:, None]

    def reject(self, x: Features) -> np.ndarray:
        """(N,) bool: True where the max combined score is below ``theta_`` (rejected as adversarial/unknown)."""
        return -self.layer_scores(x)[:, 0] < self.theta_

    def _state(self):
        state = {"classes": self.classes_, "theta": np.array(self.theta_)}
        for j, svms in enumerate(self.layer_svms_):
            state[f"shift{j}"], state[f"scale{j}"] = self.shift_[j], self.scale_[j]
            for c, s in enumerate(svms):
                state.update(s.state(f"l{j}c{c}_"))
        for c, s in enumerate(self.combiner_svms_):
            state.update(s.state(f"comb{c}_"))
        return state

    def _set_state(self, arrays):
        self.classes_, self.theta_ = arrays["classes"], float(arrays["theta"])
        n_layers, n_classes = len(self.layers_), len(self.classes_)
        self.shift_ = [arrays[f"shift{j}"] for j in range(n_layers)]
        self.scale_ = [arrays[f"scale{j}"] for j in range(n_layers)]
        self.layer_svms_ = [
            [RBFSVM.from_state(arrays, f"l{j}c{c}_") for c in range(n_classes)] for j in range(n_layers)
        ]
        self.combiner_svms_ = [RBFSVM.from_state(arrays, f"comb{c}_") for c in range(n_classes)]
