"""Runs: one home for everything above the computing layers.

config (defaults, overrides, validation against the live registries) -> plan (cells) -> executor (in dependency
order, committing each cell to the results store) -> tables and run card. Cells are instances of the stages in
:mod:`engine.runs.stages` (data, model, gmms, calibrate, attack, detect, features, study); the studies are
registered in :mod:`engine.runs.studies`; artifacts shared between stages are named in
:mod:`engine.runs.artifacts`.
See docs/runs.md.
"""

from engine.runs.artifacts import Artifacts, Projection, load_scores, save_scores
from engine.runs.cells import Cell, CellOutput, Stage, topological
from engine.runs.config import DEFAULTS, QUICK, choices, load_config, validate
from engine.runs.context import RunContext
from engine.runs.executor import CellFailed, LocalExecutor
from engine.runs.overrides import ConfigError
from engine.runs.run import RunResult, execute, run_dir
from engine.runs.schema import ROW_COLUMNS, dataset_label, fingerprint, row
from engine.runs.stages import STAGES
from engine.runs.store import ResultStore
from engine.runs.studies import STUDIES

__all__ = [
    "DEFAULTS",
    "QUICK",
    "ROW_COLUMNS",
    "STAGES",
    "STUDIES",
    "Artifacts",
    "Cell",
    "CellFailed",
    "CellOutput",
    "ConfigError",
    "LocalExecutor",
    "Projection",
    "ResultStore",
    "RunContext",
    "RunResult",
    "Stage",
    "choices",
    "dataset_label",
    "execute",
    "fingerprint",
    "load_scores",
    "load_config",
    "row",
    "run_dir",
    "save_scores",
    "topological",
    "validate",
]
