"""The run report: one self-contained HTML page built from a finished run (engine.runs.RunResult)."""

from engine.report.audit import build_report, summary_lines, write_report
from engine.report.robustness import robustness_lines
from engine.report.tables import clean_table, detection_table
from engine.report.verdicts import Verdict, verdicts

__all__ = [
    "Verdict",
    "build_report",
    "clean_table",
    "detection_table",
    "robustness_lines",
    "summary_lines",
    "verdicts",
    "write_report",
]
