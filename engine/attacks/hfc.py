"""The Hierarchical Feature Constraint add-on (Yao et al., MICCAI 2021; docs/methods.md, HFC).

Per (layer l, class c) a Gaussian mixture is fitted on GAP features f_l of the training images of class c
(:func:`fit_hfc_gmms`). ``HFC(gmms)`` passed as ``constraint=`` to any gradient attack adds, per sample,
``lam * sum_l term_l(f_l(x'))`` under the mixtures of the sample's *target* class, computed by
``engine.ops.hfc_loss`` (all layers in one fused kernel call) on the features of the same forward pass as the
logits (an ``engine.models.FeatureExtractor``). ``mode="typical"`` (an adaptive variant) pulls each layer's
log-likelihood toward the clean median of the target class instead, from :func:`typical_reference`.

Untargeted attacks: the constraint class is, at each step, the currently most likely class other than the
true one (for a binary model: simply the other class, the paper's setting). Prefer a targeted attack
(``targeted=True``, ``"random"`` or ``"least_likely"``) so the class does not change between steps.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.attacks.base import check_images
from engine.data import iter_batches
from engine.errors import UserError, UserTypeError
from engine.fileio import atomic_write
from engine.metrics import robust_location_scale
from engine.mixture import GaussianMixture
from engine.models import Augment, FeatureExtractor, eval_mode, extract_pooled, fast_input, model_device, model_dtype
from engine.models.features import resolve_layers
from engine.ops import gmm_log_prob, hfc_loss

log = logging.getLogger("engine.attacks")
MANIFEST = "hfc_gmms.json"
HFC_MODES = ("nearest", "loglik", "typical")
# The reference's training-feature augmentation (datasets.py, APTOS: resize to 280, random 256 crop, random
# horizontal and vertical flips) as an Augment: both flips and a shift of up to 12/256 of the image per axis.
HFC_REFERENCE_AUGMENT = Augment(
    hflip=True, vflip=True, max_rotate_deg=0.0, max_shift=12 / 256, brightness=0.0, contrast=0.0
)


class HFC:
    """The HFC constraint: ``gmms[layer][c]`` are per-class mixtures; ``layers`` (default: all) are constrained.

    ``mode="nearest"`` is the reference code's term ||(h - mu_k*) L_k*||^2 / d_l; ``"loglik"`` is -log p_l(h),
    the paper's stated objective; ``"typical"`` is |log p_l(h) - m_(l,c)| / s_(l,c), with the clean median and
    robust scale per (layer, class) in ``typical`` (from :func:`typical_reference`, required for that mode only).
    ``weights`` optionally weighs the layers; ``lam`` scales the whole term.
    """

    def __init__(
        self,
        gmms: Mapping[str, Sequence[GaussianMixture]],
        layers: Sequence[str] | None = None,
        lam: float = 1.0,
        mode: str = "nearest",
        weights: Sequence[float] | None = None,
        backend: str = "auto",
        typical: Mapping[str, tuple[Any, Any]] | None = None,
    ) -> None:
        if not isinstance(gmms, Mapping) or not gmms:
            raise UserTypeError("gmms must be a non-empty mapping {layer: [GaussianMixture per class]}")
        for layer, per_class in gmms.items():
            if isinstance(per_class, GaussianMixture) or not all(isinstance(g, GaussianMixture) for g in per_class):
                raise UserTypeError(f"gmms[{layer!r}] must be a sequence of GaussianMixture, one per class")
        layers = list(gmms) if layers is None else list(layers)
        unknown = [name for name in layers if name not in gmms]
        if not layers or unknown:
            raise UserError(f"layers must be a non-empty subset of the fitted layers {list(gmms)}, got {layers}")
        if mode not in HFC_MODES:
            raise UserError(f"mode must be one of {HFC_MODES}, got {mode!r}")
        if not np.isfinite(lam) or lam < 0:
            raise UserError(f"lam must be a finite float >= 0, got {lam!r}")
        if weights is not None and (len(weights) != len(layers) or not np.all(np.isfinite(weights))):
            raise UserError(f"weights must be {len(layers)} finite numbers (one per layer), got {weights!r}")
        self.gmms = {name: list(gmms[name]) for name in layers}
        self.layers = layers
        self.lam = float(lam)
        self.mode = mode
        self.weights = None if weights is None else list(weights)
        self.backend = backend
        self.typical = self._check_typical(typical)
        self._extractors: dict[nn.Module, nn.Module] = {}  # one set of hooks per model, reused by every attack

    def _check_typical(self, typical: Any) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
        if self.mode != "typical":
            if typical is not None:
                raise UserError(f"typical is only used by mode='typical', got mode={self.mode!r}")
            return None
        if not isinstance(typical, Mapping):
            raise UserTypeError(
                "mode='typical' needs typical={layer: (median per class, scale per class)}, "
                "e.g. typical_reference(gmms, clean validation features, labels)"
            )
        checked = {}
        for name in self.layers:
            if name not in typical:
                raise UserError(f"typical has no entry for the constrained layer {name!r}")
            try:
                median, scale = (np.array(a, dtype=np.float64) for a in typical[name])
            except (TypeError, ValueError):
                raise UserTypeError(f"typical[{name!r}] must be a pair (median, scale) of arrays") from None
            shape = (len(self.gmms[name]),)
            if median.shape != shape or scale.shape != shape:
                raise UserError(
                    f"typical[{name!r}] must hold a median and a scale of shape {shape} (one per class), "
                    f"got {median.shape} and {scale.shape}"
                )
            if not (np.all(np.isfinite(median)) and np.all(np.isfinite(scale)) and np.all(scale > 0)):
                raise UserError(f"typical[{name!r}] must hold finite medians and finite scales > 0")
            checked[name] = (median, scale)
        return checked

    def __repr__(self) -> str:
        return f"HFC(layers={len(self.layers)}, lam={self.lam}, mode={self.mode!r})"

    def extractor(self, model: nn.Module) -> nn.Module:
        """The (cached) FeatureExtractor returning logits and the constrained layers' GAP features in one pass."""
        if model not in self._extractors:
            self._extractors[model] = FeatureExtractor(model, self.layers, pooled=True)
        return self._extractors[model]

    def loss(self, features: Mapping[str, torch.Tensor], classes: torch.Tensor) -> torch.Tensor:
        """(N,) ``lam *`` the weighted sum of the layer terms under the mixtures of ``classes``."""
        if self.mode == "typical":
            weights = [1.0] * len(self.layers) if self.weights is None else self.weights
            terms = zip(self.layers, weights, strict=True)
            return self.lam * sum(w * self._typical_term(name, features[name], classes) for name, w in terms)
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

    def _typical_term(self, name: str, h: torch.Tensor, classes: Any) -> torch.Tensor:
        """(N,) |log p(h) - median| / scale of one layer, with autograd to ``h`` (the fused loglik kernel)."""
        log_p = -hfc_loss([h], [self.gmms[name]], "loglik", classes=classes, reduction="none", backend=self.backend)
        index = torch.as_tensor(classes, device=h.device).long()
        median, scale = (torch.as_tensor(a, dtype=log_p.dtype, device=h.device)[index] for a in self.typical[name])
        return (log_p - median).abs() / scale

    def log_likelihood(self, features: Mapping[str, torch.Tensor], classes: Any) -> dict[str, np.ndarray]:
        """Per layer, the (N,) float64 log-likelihood of each feature under its class's mixture (for evaluation)."""
        classes = np.asarray(torch.as_tensor(classes).cpu())
        return {name: _class_log_likelihood(self.gmms[name], features[name], classes) for name in self.layers}


def _class_log_likelihood(per_class: Sequence[GaussianMixture], features: Any, classes: np.ndarray) -> np.ndarray:
    """(N,) float64 log-likelihood of each row of ``features`` under the mixture of its class in ``classes``."""
    feats = torch.as_tensor(features).detach().double().cpu()
    values = np.zeros(len(classes))
    for c in np.unique(classes):
        rows = np.nonzero(classes == c)[0]
        values[rows] = gmm_log_prob(feats[rows], per_class[int(c)]).numpy()
    return values


def typical_reference(
    gmms: Mapping[str, Sequence[GaussianMixture]], features: Mapping[str, Any], labels: Any, min_images: int = 5
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{layer: (median (C,), scale (C,))}`` of the log-likelihood of clean images of each class c under G_(l,c),
    for ``HFC(mode="typical", typical=...)``; scale = 1.4826 x MAD (a normal's standard deviation).

    ``features`` are clean (validation) GAP features ``{layer: (N, d_l)}`` (e.g. :func:`extract_features`) with
    their true ``labels``; every layer of ``gmms`` needs an entry. A class with fewer than ``min_images`` images
    takes the statistics of all images, each under its own class's mixture (one warning names such classes).
    """
    if not isinstance(gmms, Mapping) or not gmms:
        raise UserTypeError("gmms must be a non-empty mapping {layer: [GaussianMixture per class]}")
    if isinstance(min_images, bool) or not isinstance(min_images, int) or min_images < 2:
        raise UserError(f"min_images must be an int >= 2, got {min_images!r}")
    labels = np.asarray(torch.as_tensor(labels).cpu())
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise UserError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if len(labels) < min_images:
        raise UserError(f"labels holds {len(labels)} image(s); a typical reference needs at least {min_images}")
    out, rare = {}, set()
    for name, per_class in gmms.items():
        if name not in features:
            raise UserError(f"features has no entry for the mixture layer {name!r}")
        if len(features[name]) != len(labels):
            raise UserError(f"features[{name!r}] has {len(features[name])} rows but labels has {len(labels)}")
        num_classes = len(per_class)
        if labels.min() < 0 or labels.max() >= num_classes:
            raise UserError(f"labels must be in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
        log_p = _class_log_likelihood(per_class, features[name], labels)
        counts = np.bincount(labels, minlength=num_classes)
        rare.update(c for c in range(num_classes) if counts[c] < min_images)
        stats = [robust_location_scale(log_p[labels == c] if counts[c] >= min_images else log_p)
                 for c in range(num_classes)]  # fmt: skip
        median, scale = (np.array(v) for v in zip(*stats, strict=True))
        if not np.all(scale > 0):
            raise UserError(f"layer {name!r}: the clean log-likelihoods of a class are all equal (scale 0)")
        out[name] = (median, scale)
    if rare:
        log.warning("typical reference: classes %s have < %d clean images, so use all images", sorted(rare), min_images)
    return out


def extract_features(
    model: nn.Module,
    data: Any,
    layers: Sequence[str],
    batch_size: int = 64,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """({layer: (N, C_l) GAP features}, logits (N, K), labels (N,)) of ``data`` in one pass, on the CPU;
    ``transform`` (e.g. an augmentation) maps each image batch before the model sees it."""
    extractor = FeatureExtractor(model, list(layers), pooled=True)
    device, dtype = model_device(model), model_dtype(model)
    labels: list[torch.Tensor] = []

    def batches() -> Any:
        for x, y in iter_batches(data, batch_size, with_labels=True, name="train_dataset"):
            labels.append(y)
            x = check_images(x)
            yield fast_input(model, (x if transform is None else transform(x)).to(device=device, dtype=dtype))

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
    augment: int = 0,
    augmentation: Augment | None = None,
    **fit_kwargs: Any,
) -> dict[str, list[GaussianMixture]]:
    """Fit one mixture per (layer, class) on the training features (one feature pass over ``train_dataset``).

    ``layers`` are names or glob patterns (see ``engine.models.available_layers``). ``bayesian`` fits sklearn's
    ``BayesianGaussianMixture`` (kept as the plug-in mixture of its point estimates); ``fit_kwargs`` go to sklearn:
    the reference fit is ``bayesian=True, n_init=2, max_iter=1000``. ``augment`` > 0 fits on the features of that
    many augmented copies of every training image instead of the images themselves (one pass each; the reference
    uses 1), augmented by ``augmentation`` (default :data:`HFC_REFERENCE_AUGMENT`) drawn from a generator seeded
    with ``seed``. Rare classes degrade as :func:`class_components` says (fewer components; the all-class mixture
    for a class with no image).
    """
    if isinstance(augment, bool) or not isinstance(augment, int) or augment < 0:
        raise UserError(f"augment must be an int >= 0 (augmented copies per training image), got {augment!r}")
    if augmentation is not None and not isinstance(augmentation, Augment):
        raise UserTypeError(f"augmentation must be an engine.models.Augment, got {type(augmentation).__name__}")
    names = resolve_layers(model, layers)
    transform = None
    if augment:
        aug = HFC_REFERENCE_AUGMENT if augmentation is None else augmentation
        transform = partial(aug, generator=torch.Generator().manual_seed(seed))
    passes = [extract_features(model, train_dataset, names, batch_size, transform) for _ in range(max(augment, 1))]
    feats = {name: torch.cat([p[0][name] for p in passes]) for name in names}
    logits, labels = passes[0][1], torch.cat([p[2] for p in passes])
    num_classes = mixture_classes(logits.shape[1]) if num_classes is None else num_classes
    classes = getattr(train_dataset, "classes", None)
    return fit_class_mixtures(feats, labels, num_classes, n_components, bayesian, seed, classes, **fit_kwargs)


def mixture_classes(logits_width: int) -> int:
    """The classes HFC's mixtures cover for a model with ``logits_width`` outputs: one per logit, and two for a
    single-logit binary head."""
    return max(int(logits_width), 2)


def fit_class_mixtures(
    feats: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    num_classes: int,
    n_components: int = 2,
    bayesian: bool = False,
    seed: int = 0,
    classes: Sequence[str] | None = None,
    **fit_kwargs: Any,
) -> dict[str, list[GaussianMixture]]:
    """One mixture per (layer, class) on training features ``feats`` ({layer: (N, C)}) with ``labels`` (N,), as
    :func:`fit_hfc_gmms` (which extracts them); ``classes`` names the classes in its warnings."""
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UserError(f"labels must be in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    counts = torch.bincount(labels, minlength=num_classes).tolist()
    components = class_components(counts, n_components, classes)

    def fit(x: torch.Tensor, k: int) -> GaussianMixture:
        if len(x) == 1:  # sklearn needs 2 images: one Gaussian at the image, covariance reg_covar * I as sklearn's
            scale = np.sqrt(fit_kwargs.get("reg_covar", 1e-6))
            return GaussianMixture(x.double().numpy(), np.eye(x.shape[1])[None] / scale, np.ones(1))
        return GaussianMixture.fit(x.double(), k, bayesian=bayesian, seed=seed, **fit_kwargs)

    gmms = {}
    for name, layer in feats.items():
        pooled = fit(layer, min(n_components, len(labels))) if 0 in components else None
        gmms[name] = [fit(layer[labels == c], k) if k else pooled for c, k in enumerate(components)]
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
        raise UserError(f"{directory} holds no {MANIFEST}; write it with save_hfc_gmms")
    manifest = json.loads(path.read_text())
    return {
        entry["name"]: [GaussianMixture.load(directory / f) for f in entry["files"]] for entry in manifest["layers"]
    }


__all__ = [
    "HFC",
    "HFC_MODES",
    "HFC_REFERENCE_AUGMENT",
    "class_components",
    "extract_features",
    "fit_hfc_gmms",
    "load_hfc_gmms",
    "save_hfc_gmms",
    "typical_reference",
]
