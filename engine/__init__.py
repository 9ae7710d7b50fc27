"""hfc-engine: adversarial-robustness audits of medical image classifiers."""

from engine import ops
from engine.mixture import GaussianMixture

__all__ = ["GaussianMixture", "ops"]
__version__ = "0.1.0"
