"""Mahalanobis detector (Lee et al., NeurIPS 2018) with input preprocessing.

Per layer l: class means mu_c and one tied precision P (inverse covariance of the class-centred training
features). Layer score = -max_c -1/2 d_c = 1/2 min_c d_c with d_c = (f - mu_c)^T P (f - mu_c), evaluated at
x_hat = x - m * sign(grad_x d_c*(f_l(x))) where c* is the closest class: the step *reduces* the distance
(clean inputs move closer to their class than adversarial ones do). ``reference_compat`` flips the sign as the
HFC code did. The magnitude m is chosen on the fit split from ``MAGNITUDES`` by the in-sample AUROC of the LR
combination (on at most ``select_max`` examples per set, whose scores at the chosen m then fit the combiner: no
second pass over the fit split). Scoring distances go through ``engine.ops.mahalanobis``.
"""

from __future__ import annotations

import hashlib
import weakref
from typing import Any

import numpy as np
import torch

from engine.detectors.base import Cost, Detector, LayerCombiner, Needs, Requirements, class_labels
from engine.detectors.features import Features
from engine.errors import UserError
from engine.metrics import auroc
from engine.models import fast_input
from engine.ops import mahalanobis

MAGNITUDES = (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01)
# preprocessed feature rows by model, then (image, layer and its fitted Gaussian, magnitude): the runs' layer arms
# read the same layers of the same images; emptied past _DONE_LIMIT rows (batch scoring sees each image once)
_DONE_LIMIT = 100_000
_DONE: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[str, str, float], np.ndarray]] = (
    weakref.WeakKeyDictionary()
)


def _digest(*parts: Any) -> str:
    """A content key of strings, numbers and arrays/tensors (their dtype, shape and bytes)."""
    h = hashlib.sha1()
    for part in parts:
        if isinstance(part, (np.ndarray, torch.Tensor)):
            array = part.detach().cpu().numpy() if isinstance(part, torch.Tensor) else part
            h.update(f"{array.dtype}{array.shape}".encode())
            h.update(np.ascontiguousarray(array).tobytes())
        else:
            h.update(repr(part).encode())
    return h.hexdigest()


RIDGE = 1e-6  # MAHA's covariance regulariser, relative to its mean diagonal (keeps P positive definite)


class TiedGaussian:
    """Class means and one tied precision (Lee et al.'s Mahalanobis model) fitted on (N, d) features.

    The covariance is that of the class-centred features plus ``reg`` times its mean variance on the diagonal;
    ``min_distance`` is the squared Mahalanobis distance to the nearest class mean (engine.ops.mahalanobis).
    """

    def __init__(self, reg: float = RIDGE) -> None:
        if not reg > 0:
            raise UserError(f"reg must be > 0, got {reg!r}")
        self.reg = float(reg)
        self.means: np.ndarray | None = None
        self.precision: np.ndarray | None = None

    def fit(self, features: Any, labels: Any) -> TiedGaussian:
        x = np.asarray(features, dtype=np.float64)
        y = np.asarray(labels)
        if x.ndim != 2 or not len(x) or not np.isfinite(x).all():
            raise UserError(f"features must be a finite, non-empty (N, d) array, got shape {x.shape}")
        if y.shape != (len(x),):
            raise UserError(f"labels must have shape ({len(x)},), got {y.shape}")
        classes = np.unique(y)
        self.means = np.stack([x[y == c].mean(0) for c in classes])
        centred = x - self.means[np.searchsorted(classes, y)]
        cov = centred.T @ centred / len(x)
        scale = max(float(np.trace(cov)) / cov.shape[0], 1e-12)
        precision = np.linalg.inv(cov + self.reg * scale * np.eye(cov.shape[0]))
        self.precision = 0.5 * (precision + precision.T)
        return self

    def min_distance(self, features: Any) -> np.ndarray:
        """(N,) squared Mahalanobis distance of each row to the nearest class mean."""
        if self.means is None:
            raise UserError("TiedGaussian is not fitted; call fit(features, labels) first")
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.means.shape[1]:
            raise UserError(f"features must have {self.means.shape[1]} columns, got shape {x.shape}")
        return np.asarray(mahalanobis(x, self.means, self.precision)).min(axis=1)


class MAHA(Detector):
    """Mahalanobis distance to the closest class mean per layer, after input preprocessing; layers combined by LR.

    ``magnitude`` fixes m (``0.0`` needs no model: scores come straight from the features); ``None`` selects it.
    """

    name = "maha"
    requires = Requirements(training_features=True)
    cost = Cost(seconds_per_image=1.2e-2, model_passes=7.0)  # feature sets x input preprocessing steps

    def __init__(
        self,
        layers: list[str] | str | None = None,
        magnitude: float | None = None,
        magnitudes: tuple[float, ...] = MAGNITUDES,
        select_max: int = 200,
        reg: float = RIDGE,
        reference_compat: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(layers, reference_compat, seed)
        if not reg > 0:
            raise UserError(f"reg must be > 0, got {reg!r}")
        self.reg = float(reg)
        if magnitude is not None and magnitude < 0:
            raise UserError(f"magnitude must be >= 0, got {magnitude}")
        if not magnitudes or min(magnitudes) < 0:
            raise UserError(f"magnitudes must be a non-empty tuple of values >= 0, got {magnitudes}")
        self.magnitude = magnitude
        self.magnitudes = tuple(float(m) for m in magnitudes)
        self.select_max = int(select_max)
        self.means_: list[np.ndarray] = []
        self.precisions_: list[np.ndarray] = []
        self.magnitude_: float | None = None

    def _default_layers(self, available):
        return list(available)

    def needs(self) -> Needs:
        self._check_fitted()
        return Needs(pooled=tuple(self.layers_), gradients=self.magnitude_ > 0)

    def _fit(self, clean, adversarial, noise, train):
        labels = class_labels(train)
        gaussians = [TiedGaussian(self.reg).fit(train.layer(name, self.dims_[name]), labels) for name in self.layers_]
        self.means_ = [g.means for g in gaussians]
        self.precisions_ = [g.precision for g in gaussians]
        if self.magnitude is not None or len(self.magnitudes) == 1:
            self.magnitude_ = self.magnitude if self.magnitude is not None else self.magnitudes[0]
            return self._fit_scores(clean, adversarial, noise)
        return self._select(clean, adversarial, noise)

    def _select(
        self, clean: Features, adversarial: Features, noise: Features | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Set ``magnitude_`` to the best of ``magnitudes`` on at most ``select_max`` examples per set and return
        those examples' layer scores at it (clean, adversarial, noise), on which the combiner is then fitted."""
        if self.source is None or clean.images is None:
            raise UserError(
                "MAHA selects its preprocessing magnitude by running the model: fit with a FeatureCache "
                "on images, or pass magnitude=0.0 to score features without preprocessing"
            )
        rng = np.random.default_rng(self.seed)
        parts = [s for s in (clean, noise) if s is not None]
        neg = [s.subset(rng.permutation(len(s))[: self.select_max]) for s in parts]
        pos = adversarial.subset(rng.permutation(len(adversarial))[: self.select_max])
        neg_at = [self._scores_at_each(s, list(self.magnitudes)) for s in neg]
        pos_at = self._scores_at_each(pos, list(self.magnitudes))
        best, best_auc = self.magnitudes[0], -1.0
        for m in sorted(self.magnitudes):
            neg_s = np.concatenate([scores[m] for scores in neg_at])
            pos_s = pos_at[m]
            scores = np.concatenate([neg_s, pos_s])
            labels = np.r_[np.zeros(len(neg_s)), np.ones(len(pos_s))]
            combiner = LayerCombiner().fit(scores, labels)
            auc = auroc(combiner(neg_s), combiner(pos_s))
            if auc > best_auc + 1e-12:
                best, best_auc = m, auc
        self.magnitude_ = best
        neg_best = [scores[best] for scores in neg_at]
        return neg_best[0], pos_at[best], neg_best[1] if noise is not None else None

    def _layer_scores(self, x: Features) -> np.ndarray:
        return self._scores_at(x, self.magnitude_)

    def _distances(self, feats: list[np.ndarray]) -> list[np.ndarray]:
        dtype = self.precisions_[0].dtype
        feats = [np.ascontiguousarray(f, dtype=dtype) for f in feats]
        return mahalanobis(feats, self.means_, self.precisions_)

    def _scores_at(self, x: Features, m: float) -> np.ndarray:
        return self._scores_at_each(x, [m])[m]

    def _scores_at_each(self, x: Features, magnitudes: list[float]) -> dict[float, np.ndarray]:
        """Layer scores (N, L) at every magnitude in ``magnitudes`` (0 = the extracted features, no model run)."""
        moving = [m for m in magnitudes if m > 0]
        feats = self._preprocessed_features(x, moving) if moving else {}
        if 0 in magnitudes:
            feats[0.0] = [x.layer(name, self.dims_[name]) for name in self.layers_]
        return {m: np.stack([0.5 * d.min(1) for d in self._distances(f)], axis=1) for m, f in feats.items()}

    def _preprocessed_features(self, x: Features, magnitudes: list[float]) -> dict[float, list[np.ndarray]]:
        """Layer l's feature of x - m * sign(grad_x d_l) for every layer l and every m. Per batch: one forward
        with gradients that ends after the deepest layer; one backward per layer (it reaches only the layers
        before l) gives the sign, shared by all magnitudes; then one forward per (layer, m), up to that layer.
        The per-layer backward passes cannot be merged: the gradient of a sum of the layers' distances is the
        sum of their gradients, whose sign is not each layer's. Rows already computed for the same image, layer,
        fitted Gaussian and magnitude (another layer arm of a run reads that layer too) are reused, not rerun."""
        source = self._model_source()
        images = x.require_images(f"MAHA with magnitudes {magnitudes}")
        sign = 1.0 if self.reference_compat else -1.0
        done = _DONE.setdefault(source.model, {})
        if len(done) > _DONE_LIMIT:
            done.clear()
        fitted = zip(self.layers_, self.means_, self.precisions_, strict=True)
        layers = [(j, _digest(name, sign, mu, p)) for j, (name, mu, p) in enumerate(fitted)]
        size = source.batch_for(images.shape[1:], backward=True)
        rows: list[str] = []
        for start in range(0, len(images), size):
            batch = images[start : start + size]
            digests = [_digest(image) for image in batch]
            rows += digests
            todo = [(j, fit) for j, fit in layers if any((d, fit, m) not in done for d in digests for m in magnitudes)]
            if todo:
                batch = fast_input(source.model, batch.to(source.device, torch.float32))
                self._preprocess_batch(source, batch, digests, todo, magnitudes, sign, done)
        return {m: [np.stack([done[d, fit, m] for d in rows]) for _, fit in layers] for m in magnitudes}

    def _preprocess_batch(
        self,
        source: Any,
        batch: torch.Tensor,
        digests: list[str],
        todo: list[tuple[int, str]],
        magnitudes: list[float],
        sign: float,
        done: dict[tuple[str, str, float], np.ndarray],
    ) -> None:
        """One batch's rows for the layers ``todo`` ((index, fit digest) pairs) at every magnitude, into ``done``."""
        names = [self.layers_[j] for j, _ in todo]
        xg = batch.clone().requires_grad_(True)
        pooled = source.pooled_until(xg, names)
        directions = []
        for (j, _), name in zip(todo, names, strict=True):
            f = pooled[name]
            mean = torch.as_tensor(self.means_[j], dtype=torch.float32, device=f.device)
            precision = torch.as_tensor(self.precisions_[j], dtype=torch.float32, device=f.device)
            diff = f[:, None, :] - mean[None]  # (B, C, d): small, only on this batch
            dist = torch.einsum("bcd,de,bce->bc", diff, precision, diff)
            closest = dist.detach().argmin(1)
            (grad,) = torch.autograd.grad(dist.gather(1, closest[:, None]).sum(), xg, retain_graph=True)
            directions.append(sign * torch.sign(grad))
        del pooled
        with torch.no_grad():
            for m in magnitudes:
                for (_, fit), name, direction in zip(todo, names, directions, strict=True):
                    moved = source.layer_feature(batch + m * direction, name).float().cpu().numpy()
                    for d, row in zip(digests, moved, strict=True):
                        done[d, fit, m] = row

    def _state(self):
        state = {"magnitude": np.array(self.magnitude_)}
        for j, (mu, p) in enumerate(zip(self.means_, self.precisions_, strict=True)):
            state[f"means{j}"], state[f"precision{j}"] = mu, p
        return state

    def _set_state(self, arrays):
        self.magnitude_ = float(arrays["magnitude"])
        self.means_ = [arrays[f"means{j}"] for j in range(len(self.layers_))]
        self.precisions_ = [arrays[f"precision{j}"] for j in range(len(self.layers_))]
