"""Adversarial-example detectors (KD, BU, LID, MAHA, SVM/SafetyNet, DNN, DNR, typicality), the HFC protocol and
metrics.

Every detector: ``det.fit(source, clean, adversarial, noise=None)``, ``det.score(x) -> (N,)`` (higher = more
adversarial), ``det.layer_scores(x) -> (N, L)``, ``det.save(dir)`` / ``Detector.load(dir)``. Features come from a
:class:`FeatureCache` (one forward pass per batch for all layers) and are shared by every detector in a run.
``Typicality`` also needs ``det.set_reference(mixtures, reference)`` (the HFC mixtures, clean validation features)
before ``fit``.
"""

from engine.detectors.base import (
    FPRS,
    Detector,
    LayerCombiner,
    Needs,
    NotFittedError,
    TooFewExamples,
    fitted_checkpoint,
    fpr_threshold,
)
from engine.detectors.bu import BU
from engine.detectors.density import KD, LID
from engine.detectors.dnn import DNN
from engine.detectors.evaluate import DetectionResult, EvalScores, ProtocolSplit, run_protocol
from engine.detectors.features import FeatureCache, Features
from engine.detectors.maha import MAHA, TiedGaussian
from engine.detectors.svm import DNR, SVM, SafetyNet
from engine.detectors.typicality import Typicality

DETECTORS = {cls.name: cls for cls in (KD, BU, LID, MAHA, SVM, SafetyNet, DNN, DNR, Typicality)}
load = Detector.load

__all__ = [
    "BU",
    "DETECTORS",
    "DNN",
    "DNR",
    "FPRS",
    "KD",
    "LID",
    "MAHA",
    "SVM",
    "DetectionResult",
    "EvalScores",
    "Detector",
    "FeatureCache",
    "Features",
    "LayerCombiner",
    "Needs",
    "NotFittedError",
    "ProtocolSplit",
    "SafetyNet",
    "TiedGaussian",
    "TooFewExamples",
    "Typicality",
    "fitted_checkpoint",
    "fpr_threshold",
    "load",
    "run_protocol",
]
