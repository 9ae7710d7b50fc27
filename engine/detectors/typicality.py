"""Typicality: how far an image's feature likelihood lies from the clean typical set, on either side.

Per layer l, the statistic is the log-likelihood of the pooled feature under the *predicted* class's HFC mixture
(``engine.attacks.fit_hfc_gmms``; ``engine.ops.gmm_log_prob``). Clean validation images give its typical range
per (layer, class): median and robust scale (1.4826 x MAD, the standard deviation of a normal). The layer score
is the absolute robust z-score |ll - median| / scale: an image far *less* likely than clean images of its class
and one far *more* likely (an AE pushed deep into the class's densest region, as HFC does) both score high. The
two-sidedness is fixed by construction; the layers are then combined like every layer-wise detector's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from engine.detectors.base import Detector, Requirements
from engine.detectors.features import Features
from engine.errors import UserError, UserTypeError
from engine.metrics import robust_location_scale
from engine.mixture import GaussianMixture
from engine.ops import gmm_log_prob

log = logging.getLogger("engine.detectors")


class Typicality(Detector):
    """Two-sided robust z-score of the predicted class's mixture log-likelihood per layer, layers combined by the
    base class's combiner (LR; one layer: rank-oriented).

    Needs the HFC mixtures (``{layer: [GaussianMixture per class]}``) and clean validation features with labels:
    call :meth:`set_reference` before :meth:`fit`. Default layers: every mixture layer. The reference keeps the
    images the model classifies correctly (all of them, grouped by prediction, when it has no labels); a class with
    fewer than ``min_reference`` of them is standardised against all reference images, each scored under its own
    class's mixture (a warning names such classes).
    """

    name = "typicality"
    requires = Requirements(mixtures=True)

    def __init__(self, layers: list[str] | str | None = None, min_reference: int = 5, seed: int = 0) -> None:
        super().__init__(layers, False, seed)
        if isinstance(min_reference, bool) or not isinstance(min_reference, int) or min_reference < 2:
            raise UserError(f"min_reference must be an int >= 2, got {min_reference!r}")
        self.min_reference = min_reference
        self.mixtures_: dict[str, list[GaussianMixture]] | None = None
        self.reference_: Features | None = None
        self.median_: np.ndarray | None = None  # (L, K): per layer and class
        self.scale_: np.ndarray | None = None  # (L, K)

    def set_reference(self, mixtures: Mapping[str, Sequence[GaussianMixture]], reference: Features) -> Typicality:
        """Give the HFC mixtures (one per class, per layer) and the clean validation ``reference`` features that
        set each (layer, class)'s typical log-likelihood; call before :meth:`fit`."""
        if not isinstance(mixtures, Mapping):
            raise UserTypeError(
                f"mixtures must be a mapping layer -> [GaussianMixture per class], got {mixtures!r:.80}"
            )
        n_classes = {len(per_class) for per_class in mixtures.values()}
        if len(n_classes) != 1 or 0 in n_classes:
            raise UserError(f"mixtures must hold one mixture per class for every layer, got counts {n_classes}")
        for name, per_class in mixtures.items():
            for c, gm in enumerate(per_class):
                if not isinstance(gm, GaussianMixture):
                    raise UserTypeError(
                        f"mixtures[{name!r}][{c}] must be an engine.GaussianMixture, got {type(gm).__name__}"
                    )
        if not isinstance(reference, Features):
            raise UserTypeError(
                f"reference must be the Features of clean validation images, got {type(reference).__name__}"
            )
        if len(reference) == 0:
            raise UserError("reference holds no image: pass the Features of clean validation images")
        self.mixtures_ = {name: list(per_class) for name, per_class in mixtures.items()}
        self.reference_ = reference
        return self

    def _default_layers(self, available: list[str]) -> list[str]:
        return list(self.mixtures_)

    def _resolve_layers(self, feats: Features) -> list[str]:
        if self.mixtures_ is None or self.reference_ is None:
            raise UserError(
                "typicality needs the HFC mixtures and clean validation features: call "
                "set_reference(mixtures, reference) before fit"
            )
        layers = super()._resolve_layers(feats)
        missing = [name for name in layers if name not in self.mixtures_]
        if missing:
            raise UserError(f"layers {missing} have no mixture; the mixtures cover {list(self.mixtures_)}")
        for name in layers:
            dims = {int(feats.layer(name).shape[1]), self.mixtures_[name][0].dim}
            if len(dims) != 1:
                raise UserError(f"layer {name!r}: features and mixtures disagree on the width, got {sorted(dims)}")
        return layers

    def _fit(self, clean, adversarial, noise, train):
        ref = self.reference_
        keep = np.ones(len(ref), bool) if ref.labels is None else ref.preds == ref.labels
        if keep.sum() < self.min_reference:
            raise UserError(
                f"typicality needs >= min_reference={self.min_reference} correctly classified reference images, "
                f"got {int(keep.sum())}"
            )
        classes = ref.preds[keep]
        n_classes = len(self.mixtures_[self.layers_[0]])
        rare = np.flatnonzero(np.bincount(classes, minlength=n_classes)[:n_classes] < self.min_reference)
        self.median_ = np.empty((len(self.layers_), n_classes))
        self.scale_ = np.empty((len(self.layers_), n_classes))
        for j, name in enumerate(self.layers_):
            ll = self._log_likelihood(ref.layer(name)[keep], classes, j)
            pooled = _location_scale(ll, name, "all classes")
            for c in range(n_classes):
                own = pooled if c in rare else _location_scale(ll[classes == c], name, f"class {c}")
                self.median_[j, c], self.scale_[j, c] = own
        if len(rare):
            log.warning("typicality: classes %s have < %d correctly classified reference images; standardised "
                        "against all classes", rare.tolist(), self.min_reference)  # fmt: skip
        return self._fit_scores(clean, adversarial, noise)

    def _log_likelihood(self, feats: np.ndarray, classes: np.ndarray, j: int) -> np.ndarray:
        """(N,) log p(feats[i] | mixture of class classes[i]) at layer ``self.layers_[j]``."""
        mixtures = self.mixtures_[self.layers_[j]]
        if len(classes) and classes.max() >= len(mixtures):
            raise UserError(f"predicted class {int(classes.max())} has no mixture; the mixtures cover {len(mixtures)}")
        feats = np.ascontiguousarray(feats, dtype=np.float64)
        out = np.empty(len(feats))
        for c in np.unique(classes):
            rows = classes == c
            out[rows] = gmm_log_prob(feats[rows], mixtures[c])
        return out

    def _layer_scores(self, x: Features) -> np.ndarray:
        preds = x.preds
        out = np.empty((len(x), len(self.layers_)))
        for j, name in enumerate(self.layers_):
            ll = self._log_likelihood(x.layer(name, self.dims_[name]), preds, j)
            out[:, j] = np.abs(ll - self.median_[j, preds]) / self.scale_[j, preds]
        return out

    def _state(self):
        state = {"median": self.median_, "scale": self.scale_}
        for j, name in enumerate(self.layers_):
            for c, gm in enumerate(self.mixtures_[name]):
                prefix = f"mixture{j}_{c}_"
                state[prefix + "means"], state[prefix + "weights"] = gm.means, gm.weights
                state[prefix + "precisions_cholesky"] = gm.precisions_cholesky
        return state

    def _set_state(self, arrays):
        self.median_, self.scale_ = arrays["median"], arrays["scale"]

        def mixture(j: int, c: int) -> GaussianMixture:
            p = f"mixture{j}_{c}_"
            return GaussianMixture(arrays[p + "means"], arrays[p + "precisions_cholesky"], arrays[p + "weights"])

        n_classes = self.median_.shape[1]
        self.mixtures_ = {name: [mixture(j, c) for c in range(n_classes)] for j, name in enumerate(self.layers_)}


def _location_scale(values: np.ndarray, layer: str, who: str) -> tuple[float, float]:
    """(median, 1.4826 x MAD) of reference log-likelihoods; ValueError when they have no spread."""
    median, scale = robust_location_scale(values)
    if not scale > 0:
        raise UserError(
            f"typicality: the reference log-likelihoods of layer {layer!r}, {who}, have no spread (MAD 0 over "
            f"{len(values)} images): the reference needs distinct clean images"
        )
    return median, scale
