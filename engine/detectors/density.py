"""Density and neighbourhood detectors on pooled features: KD (Feinman et al. 2017) and LID (Ma et al. 2018).

All KDE and k-NN work goes through ``engine.ops`` (compiled kernels).
"""

from __future__ import annotations

import numpy as np

from engine.detectors.base import Cost, Detector, Requirements, TooFewExamples, class_labels
from engine.detectors.features import Features
from engine.errors import UserError
from engine.ops import kde_log_density, knn_distances, lid

BANDWIDTH_FACTORS = tuple(np.geomspace(0.25, 4.0, 9))  # KD CV grid, times the median within-class 1-NN distance


class KD(Detector):
    """Kernel density: score = -log p(f(x) | predicted class), a Gaussian KDE of that class's training features.

    One score per layer (default: the last hooked layer). ``bandwidth`` fixes the bandwidth; otherwise it is chosen
    per layer by ``cv_folds``-fold cross-validated log-likelihood of the clean training features over
    ``BANDWIDTH_FACTORS`` x the median within-class nearest-neighbour distance. ``reference_compat`` uses the HFC
    code's untuned bandwidth 1.0. A predicted class without training features falls back to all classes' KDE.
    """

    name = "kd"
    requires = Requirements(training_features=True)
    cost = Cost(seconds_per_image=2.3e-3)

    def __init__(
        self,
        layers: list[str] | str | None = None,
        bandwidth: float | None = None,
        cv_folds: int = 3,
        reference_compat: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(layers, reference_compat, seed)
        if bandwidth is not None and not bandwidth > 0:
            raise UserError(f"bandwidth must be > 0, got {bandwidth}")
        if cv_folds < 2:
            raise UserError(f"cv_folds must be >= 2, got {cv_folds}")
        self.bandwidth = bandwidth
        self.cv_folds = int(cv_folds)
        self.refs_: list[np.ndarray] = []
        self.ref_labels_: np.ndarray | None = None
        self.bandwidths_: np.ndarray | None = None

    def _fit(self, clean, adversarial, noise, train):
        self.ref_labels_ = class_labels(train)
        self.refs_ = [np.ascontiguousarray(train.layer(name, self.dims_[name])) for name in self.layers_]
        if self.bandwidth is not None:
            bws = [self.bandwidth] * len(self.layers_)
        elif self.reference_compat:
            bws = [1.0] * len(self.layers_)
        else:
            bws = [self._cv_bandwidth(ref, self.ref_labels_) for ref in self.refs_]
        self.bandwidths_ = np.asarray(bws, dtype=np.float64)
        return self._fit_scores(clean, adversarial, noise)

    def _cv_bandwidth(self, feats: np.ndarray, labels: np.ndarray) -> float:
        nn1 = [
            knn_distances(feats[labels == c], feats[labels == c], 1, exclude_self=True)[:, 0]
            for c in np.unique(labels)
            if (labels == c).sum() > 2  # knn_distances(exclude_self) needs 3 references for k=1; rarer classes skip
        ]
        base = float(np.median(np.concatenate(nn1))) if nn1 else float(feats.std() + 1e-12)
        base = base if base > 0 else 1.0
        rng = np.random.default_rng(self.seed)
        fold = rng.permutation(len(feats)) % self.cv_folds
        best, best_ll = base, -np.inf
        for factor in BANDWIDTH_FACTORS:
            h, ll = base * factor, 0.0
            for f in range(self.cv_folds):
                for c in np.unique(labels):
                    held, kept = (fold == f) & (labels == c), (fold != f) & (labels == c)
                    if held.any() and kept.any():
                        ll += float(kde_log_density(feats[held], feats[kept], h).sum())
            if ll > best_ll:
                best, best_ll = h, ll
        return best

    def _layer_scores(self, x: Features) -> np.ndarray:
        preds = x.preds
        out = np.empty((len(x), len(self.layers_)))
        for j, name in enumerate(self.layers_):
            feats, ref, h = x.layer(name, self.dims_[name]), self.refs_[j], float(self.bandwidths_[j])
            feats = feats.astype(ref.dtype, copy=False)
            for c in np.unique(preds):
                rows = preds == c
                ref_c = ref[self.ref_labels_ == c] if (self.ref_labels_ == c).any() else ref
                out[rows, j] = -kde_log_density(np.ascontiguousarray(feats[rows]), ref_c, h)
        return out

    def _state(self):
        state = {"ref_labels": self.ref_labels_, "bandwidths": self.bandwidths_}
        state.update({f"ref{j}": r for j, r in enumerate(self.refs_)})
        return state

    def _set_state(self, arrays):
        self.ref_labels_, self.bandwidths_ = arrays["ref_labels"], arrays["bandwidths"]
        self.refs_ = [arrays[f"ref{j}"] for j in range(len(self.layers_))]


class LID(Detector):
    """Local intrinsic dimensionality per layer (k nearest of a minibatch of clean reference features).

    The clean fit features are split (seeded shuffle) into reference minibatches of ``batch_size``. A clean fit
    example is scored against its own minibatch with itself excluded; any other query row i is scored against
    minibatch ``i mod n_batches``. ``reference_compat`` reproduces the reference code: take k+1 neighbours and
    always drop the first (which drops a true neighbour for queries outside the batch). Layers combined by LR.
    """

    name = "lid"
    cost = Cost(seconds_per_image=6e-4)

    def __init__(
        self,
        layers: list[str] | str | None = None,
        k: int = 20,
        batch_size: int = 100,
        reference_compat: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(layers, reference_compat, seed)
        if k < 1 or batch_size <= k + 1:
            raise UserError(f"need 1 <= k < batch_size - 1, got k={k}, batch_size={batch_size}")
        self.k, self.batch_size = int(k), int(batch_size)
        self.refs_: list[np.ndarray] = []

    def _default_layers(self, available):
        return list(available)

    def _batches(self, n: int) -> list[np.ndarray]:
        """Row indices of each reference minibatch (a short tail is merged into the previous batch)."""
        order = np.random.default_rng(self.seed).permutation(n)
        cuts = list(range(self.batch_size, n - self.k - 1, self.batch_size))
        return np.split(order, cuts)

    def _fit(self, clean, adversarial, noise, train):
        if len(clean) <= self.k + 1:
            raise TooFewExamples(f"LID needs more than k+1={self.k + 1} clean examples, got {len(clean)}")
        batches = self._batches(len(clean))
        self.refs_ = []
        clean_scores = np.empty((len(clean), len(self.layers_)))
        for j, name in enumerate(self.layers_):
            feats = clean.layer(name, self.dims_[name])
            ref = np.stack([feats[b[: self.batch_size]] for b in batches if len(b) >= self.batch_size] or [feats])
            self.refs_.append(np.ascontiguousarray(ref))
            for b in batches:
                clean_scores[b, j] = self._lid(feats[b], feats[b], member=True)
        noise_scores = None if noise is None else self._layer_scores(noise)
        return clean_scores, self._layer_scores(adversarial), noise_scores

    def _lid(self, queries: np.ndarray, ref: np.ndarray, member: bool) -> np.ndarray:
        queries = np.ascontiguousarray(queries, dtype=ref.dtype)
        if self.reference_compat:
            dist = knn_distances(queries, ref, self.k + 1)[:, 1:].astype(np.float64)
            return -1.0 / np.log(dist / dist[:, -1:]).mean(1)
        return np.asarray(lid(queries, ref, k=self.k, exclude_self=member), dtype=np.float64)

    def _layer_scores(self, x: Features) -> np.ndarray:
        out = np.empty((len(x), len(self.layers_)))
        for j, name in enumerate(self.layers_):
            feats, refs = x.layer(name, self.dims_[name]), self.refs_[j]
            assign = np.arange(len(x)) % len(refs)
            for b in np.unique(assign):
                out[assign == b, j] = self._lid(feats[assign == b], refs[b], member=False)
        return out

    def _state(self):
        return {f"ref{j}": r for j, r in enumerate(self.refs_)}

    def _set_state(self, arrays):
        self.refs_ = [arrays[f"ref{j}"] for j in range(len(self.layers_))]
