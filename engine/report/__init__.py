"""The run report: one self-contained HTML page built from a finished run (engine.runs.RunResult)."""

from engine.report.audit import build_report, clean_table, detection_table, summary_lines, write_report

__all__ = ["build_report", "clean_table", "detection_table", "summary_lines", "write_report"]
