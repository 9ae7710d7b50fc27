"""The papers' studies, registered beside the audit's stages: paper A's stress test / fixed-direction analysis and
paper B's UAP fine-tuning defence. A run selects them by name (``studies: [stress, uap]``); each registry entry
carries its run function, defaults, tiny test settings, report sections and cost estimate (see docs/studies.md).

>>> result = STUDIES["stress"].run(STUDIES["stress"].tiny, Path("runs/stress"))
>>> result.rows[0], result.payload["verdict"], STUDIES["stress"].sections(result.payload)
"""

from engine.runs.studies.base import Study, StudyResult
from engine.runs.studies.costs import stress_cost, uap_cost
from engine.runs.studies.finetune import UAP_KINDS, Ensemble, craft_uap, uap_finetune
from engine.runs.studies.stress import STRESS_DEFAULTS, STRESS_TINY, matched_models, run_stress_study
from engine.runs.studies.stress_report import stress_sections
from engine.runs.studies.uap import UAP_DEFAULTS, UAP_TINY, run_uap_study
from engine.runs.studies.uap_report import uap_sections

STUDIES: dict[str, Study] = {
    study.name: study
    for study in (
        Study(
            "stress",
            "Stress test and fixed-direction analysis (paper A)",
            run_stress_study,
            STRESS_DEFAULTS,
            STRESS_TINY,
            stress_sections,
            stress_cost,
        ),
        Study(
            "uap",
            "UAP attacks and UAP fine-tuning defence (paper B)",
            run_uap_study,
            UAP_DEFAULTS,
            UAP_TINY,
            uap_sections,
            uap_cost,
        ),
    )
}

__all__ = [
    "STRESS_DEFAULTS",
    "STRESS_TINY",
    "STUDIES",
    "UAP_DEFAULTS",
    "UAP_KINDS",
    "UAP_TINY",
    "Ensemble",
    "Study",
    "StudyResult",
    "craft_uap",
    "matched_models",
    "run_stress_study",
    "run_uap_study",
    "stress_sections",
    "uap_finetune",
    "uap_sections",
]
