"""The audit's stages, registered by name: what a cell of each kind computes and what it is expected to cost.

data -> model -> gmms -> calibrate -> attack -> detect / features, plus study (engine.runs.studies). Executors
look a cell's stage up here (:data:`STAGES`), so a cell is plain data that any worker can run.
"""

from engine.runs.cells import Stage
from engine.runs.stages.attack import attack_cost, make_attack, run_attack
from engine.runs.stages.calibrate import calibrate_cost, run_calibrate
from engine.runs.stages.data import data_cost, run_data
from engine.runs.stages.detect import detect_cost, make_detector, run_detect
from engine.runs.stages.features import features_cost, run_features
from engine.runs.stages.model import gmms_cost, model_cost, run_gmms, run_model, training_settings
from engine.runs.stages.study import run_study, study_cost

STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage("data", run_data, data_cost),
        Stage("model", run_model, model_cost),
        Stage("gmms", run_gmms, gmms_cost),
        Stage("calibrate", run_calibrate, calibrate_cost),
        Stage("attack", run_attack, attack_cost),
        Stage("detect", run_detect, detect_cost),
        Stage("features", run_features, features_cost),
        Stage("study", run_study, study_cost),
    )
}

__all__ = ["STAGES", "make_attack", "make_detector", "training_settings"]
