"""Runs: configuration, cells, executors and the resumable results store."""

from engine.sweep.config import ConfigError, load_config
from engine.sweep.executor import Cell, CellOutput, LocalExecutor
from engine.sweep.store import ResultStore

__all__ = ["Cell", "CellOutput", "ConfigError", "LocalExecutor", "ResultStore", "load_config"]
