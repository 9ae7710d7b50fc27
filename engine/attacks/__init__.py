"""Adversarial attacks: per-image (FGSM, BIM, PGD, MI-FGSM, CW-L2, CW-Linf), the HFC add-on, universal
perturbations (:mod:`engine.attacks.uap`), noise controls and incremental storage of adversarial sets.

    attack = PGD(model, eps="8/255", steps=20, targeted=True, constraint=HFC(gmms))
    result = attack(x, target)        # AttackResult(adv, success, logits, target, norms_linf, norms_l2, ...)
"""

from engine.attacks.base import TARGET_MODES, Attack, AttackResult, parse_eps
from engine.attacks.cw import CWL2
from engine.attacks.gradient import BIM, FGSM, MIFGSM, PGD, CWLinf, IterativeAttack
from engine.attacks.hfc import (
    HFC,
    HFC_MODES,
    HFC_REFERENCE_AUGMENT,
    extract_features,
    fit_class_mixtures,
    fit_hfc_gmms,
    load_hfc_gmms,
    mixture_classes,
    save_hfc_gmms,
    typical_reference,
)
from engine.attacks.noise import NOISE_KINDS, noise_like
from engine.attacks.store import AdvDataset, AdvWriter, load_adversarial
from engine.attacks.uap import (
    UAPResult,
    data_free_uap,
    deepfool_uap,
    deepfool_uap_batched,
    evaluate_uap,
    sgd_uap,
    targeted_uap,
)

ATTACKS = {"fgsm": FGSM, "bim": BIM, "pgd": PGD, "mifgsm": MIFGSM, "cw_l2": CWL2, "cw_linf": CWLinf}

__all__ = [
    "ATTACKS",
    "HFC_MODES",
    "HFC_REFERENCE_AUGMENT",
    "NOISE_KINDS",
    "TARGET_MODES",
    "AdvDataset",
    "AdvWriter",
    "Attack",
    "AttackResult",
    "BIM",
    "CWL2",
    "CWLinf",
    "FGSM",
    "HFC",
    "IterativeAttack",
    "MIFGSM",
    "PGD",
    "UAPResult",
    "data_free_uap",
    "deepfool_uap",
    "deepfool_uap_batched",
    "evaluate_uap",
    "extract_features",
    "fit_class_mixtures",
    "fit_hfc_gmms",
    "load_adversarial",
    "load_hfc_gmms",
    "mixture_classes",
    "noise_like",
    "parse_eps",
    "save_hfc_gmms",
    "sgd_uap",
    "targeted_uap",
    "typical_reference",
]
