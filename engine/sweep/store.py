"""The run's results store: one SQLite database per run, every finished cell committed atomically.

A cell is identified by a key (a stable string built from its inputs). ``done(key)`` tells whether it has
finished; ``commit(key, rows, payload)`` writes its metric rows and its JSON payload in ONE transaction, so a
process killed at any moment (kill -9 included) leaves either the whole cell or nothing. Large artifacts (models,
GMMs, adversarial sets, fitted detectors) live as files under ``artifacts/`` written with :func:`atomic_write`
(engine.fileio: write to a temporary name, fsync, rename) and are referenced from payloads by relative path.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROW_COLUMNS = ("dataset", "model", "attack", "eps", "hfc", "detector", "metric", "value", "ci_low", "ci_high")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    key TEXT PRIMARY KEY,
    stage TEXT NOT NULL,
    payload TEXT NOT NULL,
    seconds REAL NOT NULL,
    finished REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rows (
    cell TEXT NOT NULL REFERENCES cells(key),
    dataset TEXT, model TEXT, attack TEXT, eps TEXT, hfc INTEGER, detector TEXT,
    metric TEXT NOT NULL, value REAL, ci_low REAL, ci_high REAL
);
CREATE INDEX IF NOT EXISTS rows_cell ON rows(cell);
"""


class ResultStore:
    """SQLite-backed store of finished cells and their long-format metric rows."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.artifacts = self.run_dir / "artifacts"
        self.artifacts.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "store.sqlite"
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def done(self, key: str) -> bool:
        return self._db.execute("SELECT 1 FROM cells WHERE key = ?", (key,)).fetchone() is not None

    def payload(self, key: str) -> dict[str, Any]:
        row = self._db.execute("SELECT payload FROM cells WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise KeyError(f"cell {key!r} has not finished")
        return json.loads(row[0])

    def commit(
        self, key: str, stage: str, payload: dict[str, Any], rows: Iterable[dict[str, Any]] = (), seconds: float = 0.0
    ) -> None:
        """Record a finished cell, its payload and its metric rows in one transaction (replacing any old ones)."""
        records = [_row_tuple(key, row) for row in rows]
        with self._transaction() as db:
            db.execute("DELETE FROM rows WHERE cell = ?", (key,))
            db.execute(
                "INSERT OR REPLACE INTO cells(key, stage, payload, seconds, finished) VALUES (?, ?, ?, ?, ?)",
                (key, stage, json.dumps(payload, sort_keys=True), seconds, time.time()),
            )
            db.executemany(f"INSERT INTO rows VALUES (?, {', '.join('?' * len(ROW_COLUMNS))})", records)

    def rows(self) -> list[dict[str, Any]]:
        """All metric rows, in a stable order."""
        cursor = self._db.execute(f"SELECT {', '.join(ROW_COLUMNS)} FROM rows ORDER BY rowid")
        return [_decode_row(dict(zip(ROW_COLUMNS, r, strict=True))) for r in cursor]

    def cells(self, stage: str | None = None) -> list[tuple[str, str, float]]:
        """(key, stage, seconds) of finished cells, optionally of one stage."""
        query = "SELECT key, stage, seconds FROM cells"
        args: tuple[str, ...] = ()
        if stage is not None:
            query, args = query + " WHERE stage = ?", (stage,)
        return list(self._db.execute(query + " ORDER BY finished", args))

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")


def _row_tuple(key: str, row: dict[str, Any]) -> tuple[Any, ...]:
    unknown = set(row) - set(ROW_COLUMNS)
    if unknown:
        raise ValueError(f"result row has unknown columns {sorted(unknown)}; allowed: {ROW_COLUMNS}")
    if "metric" not in row:
        raise ValueError("result row needs a 'metric'")
    values = []
    for col in ROW_COLUMNS:
        value = row.get(col)
        if col == "hfc" and value is not None:
            value = int(bool(value))
        elif col in ("value", "ci_low", "ci_high") and value is not None:
            value = float(value)
        elif col == "eps" and value is not None:
            value = str(value)
        values.append(value)
    return (key, *values)


def _decode_row(row: dict[str, Any]) -> dict[str, Any]:
    if row["hfc"] is not None:
        row["hfc"] = bool(row["hfc"])
    for col in ("value", "ci_low", "ci_high"):
        if row[col] is None:
            row[col] = math.nan
    return row
