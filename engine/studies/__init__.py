"""The papers' studies as runs: paper A's stress test / fixed-direction analysis and paper B's UAP defence.

Each study is one function ``run_<name>_study(config, workdir, progress) -> StudyResult`` (rows for the results
store, a JSON payload, ``sections()`` for the HTML report); ``config`` is merged over the study's DEFAULTS.
Trained and fine-tuned weights are cached under ``workdir`` so a resumed run does not retrain. See docs/studies.md.

>>> result = run_stress_study(STRESS_DEFAULTS, Path("runs/stress"))
>>> result.rows[0], result.payload["verdict"], result.sections()
"""

from engine.studies.common import StudyResult
from engine.studies.finetune import UAP_KINDS, Ensemble, craft_uap, uap_finetune
from engine.studies.metrics import TiedGaussian, mean_pairwise_cosine, paired_ttest, relative_deviation, resample_kappas
from engine.studies.stress import STRESS_DEFAULTS, STRESS_TINY, run_stress_study, stress_sections
from engine.studies.uap import UAP_DEFAULTS, UAP_TINY, run_uap_study
from engine.studies.uap_report import uap_sections

STUDIES = {"stress": (run_stress_study, STRESS_DEFAULTS), "uap": (run_uap_study, UAP_DEFAULTS)}

__all__ = [
    "STRESS_DEFAULTS",
    "STRESS_TINY",
    "STUDIES",
    "UAP_DEFAULTS",
    "UAP_KINDS",
    "UAP_TINY",
    "Ensemble",
    "StudyResult",
    "TiedGaussian",
    "craft_uap",
    "mean_pairwise_cosine",
    "paired_ttest",
    "relative_deviation",
    "resample_kappas",
    "run_stress_study",
    "run_uap_study",
    "stress_sections",
    "uap_finetune",
    "uap_sections",
]
