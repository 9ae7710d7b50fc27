"""The Hierarchical Feature Constraint add-on (Yao et al., MICCAI 2021; docs/methods.md, HFC).

Per (layer l, class c) a Gaussian mixture is fitted on GAP features f_l of the training images of class c
(:func:`fit_hfc_gmms`). ``HFC(gmms)`` passed as ``constraint=`` to any gradient attack adds, per sample,
``lam * sum_l term_l(f_l(x'))`` under the mixtures of the sample's *target* class, computed by
``engine.ops.hfc_loss`` (all layers in one fused kernel call) on the features of the same forward pass as the
logits (an ``engine.models.FeatureExtractor``).

Untargeted attacks: the constraint class is, at each step, the currently most likely class other than the
true one (for a binary model: simply the other class, the paper's setting). Prefer a targeted attack
(``targeted=True``, ``"random"`` or ``"least_likely"``) so the class does not change between steps.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.attacks.base import check_images
from engine.data import iter_batches
from engine.fileio import atomic_write
from engine.mixture import GaussianMixture
from engine.models import FeatureExtractor, eval_mode, extract_pooled, model_device, model_dtype
from engine.models.features import resolve_layers
from engine.ops import gmm_log_prob, hfc_loss

log = logging.getLogger("engine.attacks")
MANIFEST = "hfc_gmms.json"
HFC_MODES = ("nearest", "loglik")


class HFC:
    """The HFC constraint: ``gmms[layer][c]`` are per-class mixtures; ``layers`` (default: all) are constrained.

    ``mode="nearest"`` is the reference code's term ||(h - mu_k*) L_k*||^2 / d_l; ``"loglik"`` is -log p_l(h),
    the paper's stated objective. ``weights`` optionally weighs the layers; ``lam`` scales the whole term.
    """

    def __init__(
        self,
        gmms: Mapping[str, Sequence[GaussianMixture]],
        layers: Sequence[str] | None = None,
        lam: float = 1.0,
        mode: str = "nearest",
        weights: Sequence[float] | None = None,
        backend: str = "auto",
    ) -> None:
        if not isinstance(gmms, Mapping) or not gmms:
            raise TypeError("gmms must be a non-empty mapping {layer: [GaussianMixture per class]}")
        for layer, per_class in gmms.items():
            if isinstance(per_class, GaussianMixture) or not all(isinstance(g, GaussianMixture) for g in per_class):
                raise TypeError(f"gmms[{layer!r}] must be a sequence of GaussianMixture, one per class")
        layers = list(gmms) if layers is None else list(layers)
        unknown = [name for name in layers if name not in gmms]
        if not layers or unknown:
            raise ValueError(f"layers must be a non-empty subset of the fitted layers {list(gmms)}, got {layers}")
        if mode not in HFC_MODES:
            raise ValueError(f"mode must be one of {HFC_MODES}, got {mode!r}")
        if not np.isfinite(lam) or lam < 0:
            raise ValueError(f"lam must be a finite float >= 0, got {lam!r}")
        self.gmms = {name: list(gmms[name]) for name in layers}
        self.layers = layers
        self.lam = float(lam)
        self.mode = mode
        self.weights = None if weights is None else list(weights)
        self.backend = backend
        self._extractors: dict[nn.Module, nn.Module] = {}  # one set of hooks per model, reused by every attack

    def __repr__(self) -> str:
        return f"HFC(layers={len(self.layers)}, lam={self.lam}, mode={self.mode!r})"

    def extractor(self, model: nn.Module) -> nn.Module:
        """The (cached) FeatureExtractor returning logits and the constrained layers' GAP features in one pass."""
        if model not in self._extractors:
            self._extractors[model] = FeatureExtractor(model, self.layers, pooled=True)
        return self._extractors[model]

    def loss(self, features: Mapping[str, torch.Tensor], classes: torch.Tensor) -> torch.Tensor:
        """(N,) ``lam *`` the weighted sum of the layer terms under the mixtures of ``classes``."""
        per_sample = hfc_loss(
            [features[name] for name in self.layers],
            [self.gmms[name] for name in self.layers],
            mode=self.mode,
            weights=self.weights,
            classes=classes,
            reduction="none",
            backend=self.backend,
        )
        return self.lam * per_sample

    def log_likelihood(self, features: Mapping[str, torch.Tensor], classes: Any) -> dict[str, np.ndarray]:
        """Per layer, the (N,) float64 log-likelihood of each feature under its class's mixture (for evaluation)."""
        classes = np.asarray(torch.as_tensor(classes).cpu())
        out = {}
        for name in self.layers:
            feats = features[name].detach().double().cpu()
            values = np.zeros(len(classes))
            for c in np.unique(classes):
                rows = np.nonzero(classes == c)[0]
                values[rows] = gmm_log_prob(feats[rows], self.gmms[name][int(c)]).numpy()
            out[name] = values
        return out


def extract_features(
    model: nn.Module, data: Any, layers: Sequence[str], batch_size: int = 64
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """({layer: (N, C_l) GAP features}, logits (N, K), labels (N,)) of ``data`` in one pass, on the CPU."""
    extractor = FeatureExtractor(model, list(layers), pooled=True)
    device, dtype = model_device(model), model_dtype(model)
    labels: list[torch.Tensor] = []

    def batches() -> Any:
        for x, y in iter_batches(data, batch_size, with_labels=True, name="train_dataset"):
            labels.append(y)
            yield check_images(x).to(device=device, dtype=dtype)

    try:
        with eval_mode(model):
            logits, feats, _ = extract_pooled(extractor, batches(), name="train_dataset")
    finally:
        extractor.remove()
    return feats, logits, torch.cat(labels)


def class_components(counts: Sequence[int], n_components: int, classes: Sequence[str] | None = None) -> list[int]:
    """Mixture components per class for its training-image ``counts``: ``n_components``, fewer for a class with
    fewer images, 0 for a class with none (its mixture is then fitted on every class's features). Logs one
    warning naming each class treated so."""
    components = [min(n_components, int(n)) for n in counts]
    notes = [
        f"{classes[c] if classes else c!r}: "
        + ("no training image, so its constraint uses the mixture of all classes" if k == 0
           else f"{k} training image(s) < n_components={n_components}, so {k} component(s)")
        for c, k in enumerate(components)
        if k < n_components
    ]  # fmt: skip
    if notes:
        log.warning("HFC mixtures: %s", "; ".join(notes))
    return components


def fit_hfc_gmms(
    model: nn.Module,
    train_dataset: Any,
    layers: Sequence[str] | str,
    n_components: int = 2,
    bayesian: bool = False,
    seed: int = 0,
    batch_size: int = 64,
    num_classes: int | None = None,
    **fit_kwargs: Any,
) -> dict[str, list[GaussianMixture]]:
    """Fit one mixture per (layer, class) on the training features (one feature pass over ``train_dataset``).

    ``layers`` are names or glob patterns (see ``engine.models.available_layers``); ``fit_kwargs`` go to sklearn
    (e.g. ``reg_covar``, ``n_init=2, max_iter=1000`` as in the reference). Rare classes degrade as
    :func:`class_components` says (fewer components; the all-class mixture for a class with no image).
    """
    names = resolve_layers(model, layers)
    feats, logits, labels = extract_features(model, train_dataset, names, batch_size)
    num_classes = max(int(logits.shape[1]), 2) if num_classes is None else num_classes
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    counts = torch.bincount(labels, minlength=num_classes).tolist()
    components = class_components(counts, n_components, getattr(train_dataset, "classes", None))

    def fit(x: torch.Tensor, k: int) -> GaussianMixture:
        if len(x) == 1:  # sklearn needs 2 images: one Gaussian at the image, covariance reg_covar * I as sklearn's
            scale = np.sqrt(fit_kwargs.get("reg_covar", 1e-6))
            return GaussianMixture(x.double().numpy(), np.eye(x.shape[1])[None] / scale, np.ones(1))
        return GaussianMixture.fit(x.double(), k, bayesian=bayesian, seed=seed, **fit_kwargs)

    gmms = {}
    for name in names:
        pooled = fit(feats[name], min(n_components, len(labels))) if 0 in components else None
        gmms[name] = [fit(feats[name][labels == c], k) if k else pooled for c, k in enumerate(components)]
    return gmms


def save_hfc_gmms(gmms: Mapping[str, Sequence[GaussianMixture]], directory: str | os.PathLike) -> Path:
    """Write ``gmms`` as a directory of .npz files (GaussianMixture.save) plus a JSON manifest written last."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {"layers": []}
    for i, (name, per_class) in enumerate(gmms.items()):
        files = []
        for c, gm in enumerate(per_class):
            fname = f"layer{i:03d}_class{c:03d}.npz"
            gm.save(directory / fname)
            files.append(fname)
        manifest["layers"].append({"name": name, "files": files})
    atomic_write(directory / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
    return directory


def load_hfc_gmms(directory: str | os.PathLike) -> dict[str, list[GaussianMixture]]:
    """Read a directory written by :func:`save_hfc_gmms`."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{directory} holds no {MANIFEST}; write it with save_hfc_gmms")
    manifest = json.loads(path.read_text())
    return {
        entry["name"]: [GaussianMixture.load(directory / f) for f in entry["files"]] for entry in manifest["layers"]
    }


__all__ = ["HFC", "HFC_MODES", "class_components", "fit_hfc_gmms", "save_hfc_gmms", "load_hfc_gmms", "extract_features"]
