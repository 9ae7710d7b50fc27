"""The run's results store: one SQLite database per run, every finished cell committed atomically.

A cell is identified by its key. ``done(key)`` tells whether it has finished; ``commit(key, stage, payload, rows,
seconds)`` writes its payload, its metric rows and its duration in ONE transaction, so a process killed at any
moment (kill -9 included) leaves either the whole cell or nothing. ``plan()`` names the cells of the config last
run in the directory (a directory rerun with another config keeps the earlier config's cells too). Large artifacts
(models, mixtures, adversarial sets, fitted detectors) live as files in the run's artifact location
(engine.runs.artifacts) and are referenced from payloads. Only the process driving the run writes the store.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from engine.runs.schema import CI_LEVEL, ROW_COLUMNS, legacy_metric, normalise_row

STORE_FILE = "store.sqlite"
MIGRATED_COLUMNS = (  # columns added to the rows table after its first version, in the order they came
    ("seed", "INTEGER"), ("variant", "TEXT"), ("arm", "TEXT"), ("eps_value", "REAL"), ("subset", "TEXT"),
    ("layer", "TEXT"), ("ci_level", "REAL"), ("n_neg", "INTEGER"), ("n_pos", "INTEGER"),
)  # fmt: skip
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
    dataset TEXT, model TEXT, seed INTEGER, attack TEXT, eps TEXT, eps_value REAL, hfc INTEGER, variant TEXT,
    arm TEXT, detector TEXT, metric TEXT NOT NULL, subset TEXT, layer TEXT, value REAL, ci_low REAL, ci_high REAL,
    ci_level REAL, n_neg INTEGER, n_pos INTEGER
);
CREATE INDEX IF NOT EXISTS rows_cell ON rows(cell);
CREATE TABLE IF NOT EXISTS plan (position INTEGER PRIMARY KEY, key TEXT NOT NULL);
"""


class ResultStore:
    """SQLite-backed store of finished cells, their payloads, durations and long-format metric rows."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / STORE_FILE
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Bring a store written by an earlier version to the current row schema: add the columns it lacks; rows
        written before ``subset`` and ``layer`` existed get their metric names split into (metric, subset, layer)
        (:func:`engine.runs.schema.legacy_metric`), their ``eps_value`` and, with an interval, its ``ci_level``; in one
        transaction."""
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(rows)")}
        missing = [(name, kind) for name, kind in MIGRATED_COLUMNS if name not in columns]
        if not missing:
            return
        with self._transaction() as db:
            for name, kind in missing:
                db.execute(f"ALTER TABLE rows ADD COLUMN {name} {kind}")
            if "subset" in columns:
                return
            for rowid, metric, detector, eps in list(db.execute("SELECT rowid, metric, detector, eps FROM rows")):
                name, subset, layer = legacy_metric(metric, detector)
                eps_value = normalise_row({"metric": name, "eps": eps})["eps_value"]
                db.execute(
                    "UPDATE rows SET metric = ?, subset = ?, layer = ?, eps_value = ? WHERE rowid = ?",
                    (name, subset, layer, eps_value, rowid),
                )
            db.execute("UPDATE rows SET ci_level = ? WHERE ci_low IS NOT NULL AND ci_high IS NOT NULL", (CI_LEVEL,))

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
        records = [(key, *(r[c] for c in ROW_COLUMNS)) for r in map(normalise_row, rows)]
        with self._transaction() as db:
            db.execute("DELETE FROM rows WHERE cell = ?", (key,))
            db.execute(
                "INSERT OR REPLACE INTO cells(key, stage, payload, seconds, finished) VALUES (?, ?, ?, ?, ?)",
                (key, stage, json.dumps(payload, sort_keys=True), seconds, time.time()),
            )
            columns = ", ".join(("cell", *ROW_COLUMNS))
            db.executemany(f"INSERT INTO rows ({columns}) VALUES ({', '.join('?' * (1 + len(ROW_COLUMNS)))})", records)

    def rows(self, keys: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Metric rows in commit order: of the cells ``keys`` (in that order), or of every cell when None."""
        columns = ", ".join(ROW_COLUMNS)
        if keys is None:
            cursor = self._db.execute(f"SELECT {columns} FROM rows ORDER BY rowid")
            return [normalise_row(dict(zip(ROW_COLUMNS, r, strict=True))) for r in cursor]
        out = []
        for key in keys:
            cursor = self._db.execute(f"SELECT {columns} FROM rows WHERE cell = ? ORDER BY rowid", (key,))
            out += [normalise_row(dict(zip(ROW_COLUMNS, r, strict=True))) for r in cursor]
        return out

    def set_plan(self, keys: Sequence[str]) -> None:
        """Record the cells of the config being run here, in plan order (replacing an earlier invocation's)."""
        with self._transaction() as db:
            db.execute("DELETE FROM plan")
            db.executemany("INSERT INTO plan(key) VALUES (?)", [(key,) for key in keys])

    def plan(self) -> list[str] | None:
        """Keys of the cells of the config last run here, in plan order; None for a store written before runs
        recorded their plan."""
        keys = [key for (key,) in self._db.execute("SELECT key FROM plan ORDER BY position")]
        return keys or None

    def cells(self, stage: str | None = None) -> list[tuple[str, str, float]]:
        """(key, stage, seconds) of finished cells, optionally of one stage, in the order they finished."""
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
