"""The detector interface: ``fit(source, clean, adversarial, noise)`` then ``score(x)`` (higher = more adversarial).

A detector computes one raw score per layer (:meth:`Detector.layer_scores`, shape (N, L)); :meth:`Detector.score`
combines them into one (N,) score with the combiner fitted on the fit split (by default standardisation + logistic
regression, the HFC protocol; a single column is oriented by its fit-split rank AUROC instead). A fitted detector
saves to a directory holding ``config.json`` (class, parameters, layers) and ``arrays.npz`` (every fitted array);
nothing is pickled, so loading never runs stored code. The config also records the fingerprint of the model the
detector was fitted on (``save(..., model=)``) and the score thresholds that flag a chosen share of clean images
(:meth:`Detector.set_thresholds`).

:meth:`Detector.needs` says what a fitted detector needs from the model besides the logits (:class:`Needs`), so a
scorer can check a model before its first batch. What a detector *class* needs to be fitted and what it costs are
facts on the class (:class:`Requirements`, :class:`Cost`; ``fit`` checks the requirements, as ART's attacks check
their ``_estimator_requirements``), so a run feeds and schedules a new detector with no table keyed by its name.
Detectors a run can name are registered in :data:`DETECTORS` (:func:`register`), which also resolves saved ones.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch import nn

from engine.detectors.features import FeatureCache, Features
from engine.errors import UserError, UserTypeError
from engine.metrics import auroc
from engine.models import dropout_modules, model_fingerprint

FORMAT_VERSION = 1
FPRS = (0.01, 0.05, 0.1)  # clean false-positive rates whose score thresholds a fitted detector records
DETECTORS: dict[str, type[Detector]] = {}  # the registry: detector name -> class (register)


class NotFittedError(RuntimeError):
    """A detector was used before ``fit`` (or ``load``)."""


class TooFewExamples(UserError):
    """The data cannot feed a detector or the detection protocol: too few correctly classified images, no
    successful AE to fit on, or fewer examples than a detector needs (LID's k + 1). A run reports
    the detector as not measurable there and goes on; escaping elsewhere, it is the user's data that is too small."""


@dataclass(frozen=True)
class Needs:
    """What a fitted detector needs from the model besides the logits: pooled (N, C) features and raw maps of
    named layers, MC-dropout passes (the model's dropout layers), input gradients (a differentiable forward)."""

    pooled: tuple[str, ...] = ()
    raw: tuple[str, ...] = ()
    dropout: bool = False
    gradients: bool = False

    @staticmethod
    def union(needs: Iterable[Needs]) -> Needs:
        """Everything any of ``needs`` needs (layers in first-seen order)."""
        needs = list(needs)
        return Needs(
            pooled=tuple(dict.fromkeys(name for n in needs for name in n.pooled)),
            raw=tuple(dict.fromkeys(name for n in needs for name in n.raw)),
            dropout=any(n.dropout for n in needs),
            gradients=any(n.gradients for n in needs),
        )


@dataclass(frozen=True)
class Requirements:
    """What a detector class needs to be fitted, besides clean, adversarial and noise features: labelled clean
    training features (a class-conditional model: ``fit(..., train=)``), the model's dropout layers (MC-dropout
    passes), raw feature maps of spatial layers, HFC's mixtures and clean reference features (``set_reference``)."""

    training_features: bool = False
    dropout: bool = False
    raw_maps: bool = False
    mixtures: bool = False


@dataclass(frozen=True)
class Cost:
    """What fitting and scoring a detector costs per pool image, beside extracting the features once: its own work
    in seconds (measured on the audits; a run refines it live) and the forward passes it runs through the model."""

    seconds_per_image: float = 1e-2
    model_passes: float = 1.0


def register(cls: type[Detector]) -> type[Detector]:
    """Add detector class ``cls`` to :data:`DETECTORS` under its ``name`` (a class decorator)."""
    if cls.name in DETECTORS and DETECTORS[cls.name] is not cls:
        raise ValueError(f"a detector named {cls.name!r} is already registered: {DETECTORS[cls.name].__name__}")
    DETECTORS[cls.name] = cls
    return cls


def fpr_threshold(clean_scores: np.ndarray, fpr: float) -> float:
    """The lowest score threshold t with at most ``fpr`` of ``clean_scores`` above it (flag: score > t)."""
    scores = np.sort(np.asarray(clean_scores, dtype=np.float64))
    if not len(scores) or not 0 < fpr < 1:
        raise UserError(f"need clean scores and 0 < fpr < 1, got {len(scores)} scores and fpr={fpr}")
    return float(scores[len(scores) - 1 - int(np.floor(fpr * len(scores)))])


class LayerCombiner:
    """Per-layer scores -> one score. Each column is standardised (fit-split mean and std); several columns are then
    weighted by logistic regression (its decision function); a single column is oriented by rank instead: times
    ``sign`` = +1 if its fit-split AUROC (negatives vs positives) is >= 0.5, else -1. A logistic regression orients
    one column by its mean, which a few extreme positives can point the wrong way for the bulk of them."""

    def __init__(self) -> None:
        self.mean = self.scale = self.coef = self.sign = None
        self.intercept = 0.0

    def fit(self, scores: np.ndarray, labels: np.ndarray) -> LayerCombiner:
        from sklearn.linear_model import LogisticRegression

        scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
        if scores.ndim != 2 or labels.shape != (len(scores),):
            raise UserError(f"scores must be (N, L) and labels (N,), got shapes {scores.shape} and {labels.shape}")
        self.mean = scores.mean(0)
        self.scale = scores.std(0)
        self.scale[self.scale == 0] = 1.0
        z = (scores - self.mean) / self.scale
        if scores.shape[1] == 1:
            self.sign = 1.0 if auroc(z[labels == 0, 0], z[labels == 1, 0]) >= 0.5 else -1.0
            self.coef, self.intercept = None, 0.0
            return self
        lr = LogisticRegression(C=1.0, max_iter=1000, class_weight="balanced")
        lr.fit(z, labels)
        self.coef, self.intercept = lr.coef_[0].astype(np.float64), float(lr.intercept_[0])
        self.sign = None
        return self

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        z = (scores - self.mean) / self.scale
        return self.sign * z[:, 0] if self.sign is not None else z @ self.coef + self.intercept

    def state(self) -> dict[str, np.ndarray]:
        if self.sign is not None:
            return {"mean": self.mean, "scale": self.scale, "sign": np.array(self.sign)}
        return {"mean": self.mean, "scale": self.scale, "coef": self.coef, "intercept": np.array(self.intercept)}

    def set_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state`; a single column saved before rank orientation (coef, no sign) keeps its LR."""
        self.mean, self.scale = arrays["mean"], arrays["scale"]
        self.sign = float(arrays["sign"]) if "sign" in arrays else None
        self.coef = arrays.get("coef")
        self.intercept = float(arrays.get("intercept", 0.0))


class Detector:
    """Base class. Subclasses set ``name``, implement ``_fit`` / ``_layer_scores`` / ``_state`` / ``_set_state``.

    ``combine``: ``"lr"`` (standardise + logistic regression over the layer scores, fitted on the fit split; one
    column: standardise + orient by rank, see :class:`LayerCombiner`) or ``"mean"`` (plain mean of the layer scores,
    for scores already on one scale).
    """

    name: ClassVar[str] = "detector"
    combine: ClassVar[str] = "lr"
    requires: ClassVar[Requirements] = Requirements()
    cost: ClassVar[Cost] = Cost()

    @classmethod
    def unmet(cls, model: nn.Module | None, mixtures: bool) -> str | None:
        """Why this detector cannot be fitted with ``model`` (None: not checked) when HFC's mixtures do (or do not)
        exist, or None."""
        if cls.requires.dropout and model is not None and not dropout_modules(model):
            why = "ONNX/TorchScript conversions lack them"
            return f"the model has no dropout layers for {cls.name}'s MC-dropout passes ({why})"
        if cls.requires.mixtures and not mixtures:
            return f"{cls.name} reads HFC's mixtures, and none were fitted"
        return None

    def __init__(self, layers: list[str] | str | None = None, reference_compat: bool = False, seed: int = 0) -> None:
        self.layers = [layers] if isinstance(layers, str) else (list(layers) if layers is not None else None)
        self.reference_compat = bool(reference_compat)
        self.seed = int(seed)
        self.source: FeatureCache | None = None
        self.layers_: list[str] | None = None  # resolved at fit
        self.dims_: dict[str, int] = {}
        self.combiner_ = LayerCombiner()
        self.model_: dict[str, Any] = {}  # fingerprint and layers of the model fitted on (set by save(model=))
        self.thresholds_: dict[str, Any] = {}  # {"fpr": {fpr: threshold}, "images": n} (set_thresholds)
        self.clean_scores_: np.ndarray | None = None  # the clean scores the thresholds came from (set_thresholds)
        self.input_size_: tuple[int, ...] | None = None  # (C, H, W) of the images it was fitted on, when known

    # -- public API -------------------------------------------------------------------------------------------
    def fit(
        self,
        source: FeatureCache | nn.Module | None,
        clean: Any,
        adversarial: Any,
        noise: Any = None,
        train: Any = None,
    ) -> Detector:
        """Fit on negatives ``clean`` (+ ``noise``) and positives ``adversarial``.

        ``source`` is the :class:`FeatureCache` (or a model, wrapped in one) that turns images into features, or
        ``None`` when every set is already :class:`Features`. ``train`` holds labelled clean features for the
        class-conditional models (``requires.training_features``: KD, MAHA, DNR); it defaults to ``clean`` with its
        labels (else predictions).
        """
        self.source = _as_source(source)
        clean, adversarial = self._features(clean, "clean"), self._features(adversarial, "adversarial")
        self._check_requirements(clean)
        noise = None if noise is None else self._features(noise, "noise")
        train = clean if train is None else self._features(train, "train")
        if len(clean) == 0 or len(adversarial) == 0:
            raise TooFewExamples(f"fit needs clean and adversarial examples, got {len(clean)} and {len(adversarial)}")
        self.layers_ = self._resolve_layers(clean)
        self.input_size_ = None if clean.images is None else tuple(int(s) for s in clean.images.shape[1:])
        self.dims_ = {name: int(clean.pooled[name].shape[1]) for name in self.layers_ if name in clean.pooled}
        clean_s, adv_s, noise_s = self._fit(clean, adversarial, noise, train)
        neg = clean_s if noise_s is None else np.concatenate([clean_s, noise_s])
        if self.combine == "lr":
            labels = np.r_[np.zeros(len(neg)), np.ones(len(adv_s))]
            self.combiner_.fit(np.concatenate([neg, adv_s]), labels)
        return self

    def layer_scores(self, x: Any) -> np.ndarray:
        """(N, L) raw per-layer scores (columns in ``self.layers_`` order; see each detector for the sign)."""
        self._check_fitted()
        return self._layer_scores(self._features(x, "x"))

    def score(self, x: Any) -> np.ndarray:
        """(N,) detection score, higher = more likely adversarial."""
        scores = self.layer_scores(x)
        return self.combiner_(scores) if self.combine == "lr" else scores.mean(1)

    def needs(self) -> Needs:
        """What the fitted detector needs from the model (default: pooled features of its layers)."""
        self._check_fitted()
        return Needs(pooled=tuple(self.layers_))

    def reads(self, layers: Sequence[str], raw_layers: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(pooled, raw) layers of those extracted that a fit can depend on, before it runs (default: every pooled
        layer): two fits on the same sets that read the same layers are the same fit."""
        return tuple(layers), ()

    def use_onnxruntime(self) -> Detector:
        """Run the detector's own networks (if any) in onnxruntime when scoring; a no-op for the others."""
        return self

    def set_thresholds(self, clean_scores: np.ndarray, fprs: Iterable[float] = FPRS) -> Detector:
        """Record, per false-positive rate, the score above which an image is flagged, from scores of clean
        images the detector was not fitted on (the audit's evaluation split)."""
        clean = np.asarray(clean_scores, dtype=np.float64)
        self.thresholds_ = {"fpr": {str(f): fpr_threshold(clean, f) for f in fprs}, "images": len(clean)}
        self.clean_scores_ = clean  # saved: thresholds at any rate (engine.detectors.thresholds)
        return self

    def threshold(self, fpr: float) -> float:
        """The recorded threshold flagging ``fpr`` of clean images (see :meth:`set_thresholds`)."""
        recorded = self.thresholds_.get("fpr", {})
        if str(float(fpr)) not in recorded:
            raise UserError(
                f"fpr {fpr} has no recorded threshold for this {self.name} detector; recorded: "
                f"{[float(f) for f in recorded] or 'none (fitted outside an audit: call set_thresholds)'}"
            )
        return float(recorded[str(float(fpr))])

    def attach(self, source: FeatureCache | nn.Module) -> Detector:
        """Give a loaded detector the model/feature cache it needs to score images."""
        self.source = _as_source(source)
        return self

    def get_params(self) -> dict[str, Any]:
        """Constructor arguments (JSON-serialisable), as in scikit-learn."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {p: getattr(self, p) for p in names}

    def save(self, path: str | Path, model: nn.Module | None = None, checkpoint: str | Path | None = None) -> Path:
        """Write the fitted detector to directory ``path`` (config.json + arrays.npz); ``model``, the model it was
        fitted on, records its fingerprint and the detector's feature layers, ``checkpoint`` that model's file
        (relative to ``path``, see :func:`fitted_checkpoint`)."""
        self._check_fitted()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if model is not None:
            needs = self.needs()
            self.model_ = {"fingerprint": model_fingerprint(model), "layers": list(needs.pooled + needs.raw)}
            if checkpoint is not None:
                self.model_["checkpoint"] = os.path.relpath(Path(checkpoint).resolve(), path.resolve())
        arrays = {f"state/{k}": np.asarray(v) for k, v in self._state().items()}
        if self.combine == "lr":
            arrays.update({f"combiner/{k}": v for k, v in self.combiner_.state().items()})
        if self.clean_scores_ is not None:
            arrays["thresholds/clean_scores"] = self.clean_scores_
        config = {
            "format": FORMAT_VERSION,
            "detector": type(self).__name__,
            "params": self.get_params(),
            "layers": self.layers_,
            "dims": self.dims_,
            "model": self.model_,
            "thresholds": self.thresholds_,
            "input_size": self.input_size_,
        }
        (path / "config.json").write_text(json.dumps(config, indent=2))
        np.savez(path / "arrays.npz", **arrays)
        return path

    @staticmethod
    def load(path: str | Path, source: FeatureCache | nn.Module | None = None) -> Detector:
        """Load a detector saved with :meth:`save` (any subclass); ``source`` is needed to score images."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a saved detector (no config.json)")
        config = json.loads((path / "config.json").read_text())
        classes = {cls.__name__: cls for cls in DETECTORS.values()}  # saved under the class name
        if config.get("format") != FORMAT_VERSION or config.get("detector") not in classes:
            raise UserError(f"{path}: unknown detector {config.get('detector')!r} / format {config.get('format')}")
        det = classes[config["detector"]](**config["params"])
        det.layers_, det.dims_ = config["layers"], {k: int(v) for k, v in config["dims"].items()}
        det.model_, det.thresholds_ = config.get("model", {}), config.get("thresholds", {})
        det.input_size_ = tuple(config["input_size"]) if config.get("input_size") else None
        with np.load(path / "arrays.npz", allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        det._set_state({k[6:]: v for k, v in arrays.items() if k.startswith("state/")})
        det.clean_scores_ = arrays.get("thresholds/clean_scores")
        if det.combine == "lr":
            det.combiner_.set_state({k[9:]: v for k, v in arrays.items() if k.startswith("combiner/")})
        if source is not None:
            det.attach(source)
        return det

    # -- helpers for subclasses -------------------------------------------------------------------------------
    def _check_requirements(self, clean: Features) -> None:
        """Raise ValueError when the model or the features lack what the class requires (:attr:`requires`)."""
        reason = self.unmet(None if self.source is None else self.source.model, mixtures=True)
        if reason is None and self.requires.raw_maps and not clean.raw:
            reason = f"{self.name} needs raw feature maps: extract them with FeatureCache(raw_layers=[...])"
        if reason is not None:
            raise ValueError(reason)

    def _default_layers(self, available: list[str]) -> list[str]:
        return available[-1:]

    def _resolve_layers(self, feats: Features) -> list[str]:
        available = feats.layer_names
        if not available:
            raise UserError(f"{self.name}: the features hold no layers")
        layers = self._default_layers(available) if self.layers is None else self.layers
        for name in layers:
            feats.layer(name)  # raises naming the available layers
        return list(layers)

    def _features(self, x: Any, what: str) -> Features:
        if isinstance(x, Features):
            return x
        if self.source is None:
            raise UserError(
                f"{what} is not Features: pass a FeatureCache/model as source (fit) or attach() one to score images"
            )
        return self.source.extract(x)

    def _check_fitted(self) -> None:
        if self.layers_ is None:
            raise NotFittedError(f"{type(self).__name__} is not fitted: call fit(...) or Detector.load(...) first")

    def _model_source(self) -> FeatureCache:
        if self.source is None:
            raise UserError(f"{self.name} runs the model: fit with a FeatureCache/model or attach() one after load")
        return self.source

    def _fit(
        self, clean: Features, adversarial: Features, noise: Features | None, train: Features
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Fit the per-layer models; return fit-split layer scores of (clean, adversarial, noise)."""
        raise NotImplementedError

    def _fit_scores(
        self, clean: Features, adversarial: Features, noise: Features | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        score = self._layer_scores
        return score(clean), score(adversarial), None if noise is None else score(noise)

    def _layer_scores(self, x: Features) -> np.ndarray:
        raise NotImplementedError

    def _state(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _set_state(self, arrays: dict[str, np.ndarray]) -> None:
        raise NotImplementedError


def fitted_checkpoint(directories: Iterable[str | Path]) -> Path:
    """The checkpoint the saved detectors in ``directories`` were fitted on (recorded by an audit's detect stage);
    ValueError when one does not record it or they name different files."""
    found = set()
    for d in directories:
        recorded = json.loads((Path(d) / "config.json").read_text()).get("model", {}).get("checkpoint")
        if recorded is None:
            raise UserError(f"detectors: {d} does not record the model it was fitted on; pass --model")
        found.add((Path(d) / recorded).resolve())
    if len(found) != 1:
        raise UserError(f"detectors: fitted on {len(found)} different models {sorted(map(str, found))}; pass --model")
    return found.pop()


def class_labels(train: Features) -> np.ndarray:
    """Labels of the class-conditional training set: true labels when known, else predictions."""
    return train.labels if train.labels is not None else train.preds


def _as_source(source: FeatureCache | nn.Module | None) -> FeatureCache | None:
    if source is None or isinstance(source, FeatureCache):
        return source
    if isinstance(source, nn.Module):
        return FeatureCache(source)
    raise UserTypeError(f"source must be a FeatureCache, a torch.nn.Module or None, got {type(source).__name__}")
