"""The audit's stages, registered by name: what a cell of each kind computes, from which inputs, and what it is
expected to cost.

data -> model -> gmms -> calibrate -> attack -> detect / features, plus study (engine.runs.studies). Executors
look a cell's stage up here (:data:`STAGES`), so a cell is plain data that any worker can run. Each stage's inputs
dataclass (``STAGES[name].inputs``) declares the config keys its cells read; engine.runs.plan fills them.
"""

from engine.runs.cells import Stage
from engine.runs.stages.attack import AttackInputs, attack_cost, make_attack, run_attack
from engine.runs.stages.calibrate import CalibrateInputs, calibrate_cost, run_calibrate
from engine.runs.stages.data import DataInputs, data_cost, run_data
from engine.runs.stages.detect import DetectInputs, detect_cost, make_detector, run_detect
from engine.runs.stages.features import FeaturesInputs, features_cost, run_features
from engine.runs.stages.model import (
    GmmsInputs,
    ModelInputs,
    gmms_cost,
    model_cost,
    run_gmms,
    run_model,
    training_settings,
)
from engine.runs.stages.study import StudyInputs, run_study, study_cost

STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage("data", run_data, data_cost, DataInputs),
        Stage("model", run_model, model_cost, ModelInputs),
        Stage("gmms", run_gmms, gmms_cost, GmmsInputs),
        Stage("calibrate", run_calibrate, calibrate_cost, CalibrateInputs),
        Stage("attack", run_attack, attack_cost, AttackInputs),
        Stage("detect", run_detect, detect_cost, DetectInputs),
        Stage("features", run_features, features_cost, FeaturesInputs),
        Stage("study", run_study, study_cost, StudyInputs),
    )
}

__all__ = ["STAGES", "make_attack", "make_detector", "training_settings"]
