"""Adversarial-example detectors (KD, BU, LID, MAHA, SVM/SafetyNet, DNN, DNR, typicality), the HFC protocol and
metrics.

Every detector: ``det.fit(source, clean, adversarial, noise=None)``, ``det.score(x) -> (N,)`` (higher = more
adversarial), ``det.layer_scores(x) -> (N, L)``, ``det.save(dir)`` / ``Detector.load(dir)``. Features come from a
:class:`FeatureCache` (one forward pass per batch for all layers) and are shared by every detector in a run.
``Typicality`` also needs ``det.set_reference(mixtures, reference)`` (the HFC mixtures, clean validation features)
before ``fit``. :data:`DETECTORS` holds the detectors a run can name (:func:`register`); each class declares what
it requires to be fitted (:class:`Requirements`) and what it costs (:class:`Cost`).
"""

from engine.detectors.base import (
    DETECTORS,
    FPRS,
    Cost,
    Detector,
    LayerCombiner,
    Needs,
    NotFittedError,
    Requirements,
    TooFewExamples,
    fitted_checkpoint,
    fpr_threshold,
    register,
)
from engine.detectors.bu import BU
from engine.detectors.density import KD, LID
from engine.detectors.dnn import DNN
from engine.detectors.evaluate import DetectionResult, EvalScores, ProtocolSplit, run_protocol
from engine.detectors.features import FeatureCache, Features
from engine.detectors.maha import MAHA, TiedGaussian
from engine.detectors.svm import DNR, SVM, SafetyNet
from engine.detectors.typicality import Typicality

for _cls in (KD, BU, LID, MAHA, SVM, SafetyNet, DNN, DNR, Typicality):
    register(_cls)
load = Detector.load

__all__ = [
    "BU",
    "DETECTORS",
    "DNN",
    "DNR",
    "FPRS",
    "Cost",
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
    "Requirements",
    "SafetyNet",
    "TiedGaussian",
    "TooFewExamples",
    "Typicality",
    "fitted_checkpoint",
    "fpr_threshold",
    "load",
    "register",
    "run_protocol",
]
