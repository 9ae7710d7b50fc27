"""The run's results store: one SQLite database per run, every finished cell committed atomically.

A cell is identified by its key. ``done(key)`` tells whether it has finished; ``commit(key, stage, payload, rows,
seconds)`` writes its payload, its metric rows and its duration in ONE transaction, so a process killed at any
moment (kill -9 included) leaves either the whole cell or nothing. ``plan()`` names the cells of the config last
run in the directory (a directory rerun with another config keeps the earlier config's cells too). Large artifacts
(models, mixtures, adversarial sets, fitted detectors) live as files in the run's artifact location
(engine.runs.artifacts) and are referenced from payloads; with an ``artifact_root`` the store records, in the same
transaction, the files a cell's payload names (``missing(key)`` lists those gone since, so the run recomputes that
cell). Only the process driving the run writes the store: a writer holds an exclusive ``fcntl.flock`` on
``store.lock`` (a second writer is refused, naming the holder's pid), and a reader (``readonly=True``: ``runs show``)
never writes, so a finished run can be read from a read-only directory. A store that SQLite cannot read is moved
aside (``store.sqlite.corrupt-<time>``), never deleted, and the user told so in one line.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from engine.errors import UserError
from engine.runs.artifacts import KINDS
from engine.runs.schema import CI_LEVEL, ROW_COLUMNS, legacy_metric, normalise_row

STORE_FILE = "store.sqlite"
LOCK_FILE = "store.lock"  # held (fcntl.flock, exclusive) by the one process writing the store; holds its pid
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
CREATE TABLE IF NOT EXISTS files (cell TEXT NOT NULL REFERENCES cells(key), path TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS files_cell ON files(cell);
"""


class StoreError(UserError):
    """The results store cannot be used: corrupt, missing, or held by another run."""


class ResultStore:
    """SQLite-backed store of finished cells, their payloads, durations and long-format metric rows."""

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        readonly: bool = False,
        artifact_root: str | os.PathLike[str] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / STORE_FILE
        self.artifact_root = None if artifact_root is None else Path(artifact_root)
        self._lock: int | None = None
        if readonly:  # a store from an earlier version is read as it is, its rows upgraded as they are read
            self._db = _open_readonly(self.path)
            self._columns = self._stored_columns()
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock = _lock(self.run_dir / LOCK_FILE)
        try:
            self._db = _open_writer(self.path)
        except StoreError:
            os.close(self._lock)
            raise
        self._db.executescript(_SCHEMA)
        self._migrate()
        self._columns = self._stored_columns()

    def _stored_columns(self) -> tuple[str, ...]:
        """The columns of :data:`ROW_COLUMNS` the rows table has (all of them, unless an old store read-only)."""
        stored = {r[1] for r in self._db.execute("PRAGMA table_info(rows)")}
        return tuple(c for c in ROW_COLUMNS if c in stored)

    def _migrate(self) -> None:
        """Bring a store written by an earlier version to the current row schema: add the columns it lacks; rows
        written before ``subset`` and ``layer`` existed get their metric names split into (metric, subset, layer)
        (:func:`legacy_row`), their ``eps_value`` and, with an interval, its ``ci_level``; in one transaction."""
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(rows)")}
        missing = [(name, kind) for name, kind in MIGRATED_COLUMNS if name not in columns]
        if not missing:
            return
        with self._transaction() as db:
            for name, kind in missing:
                db.execute(f"ALTER TABLE rows ADD COLUMN {name} {kind}")
            if "subset" in columns:
                return
            old = ("metric", "detector", "eps", "ci_low", "ci_high")
            for rowid, *values in list(db.execute(f"SELECT rowid, {', '.join(old)} FROM rows")):
                new = legacy_row(dict(zip(old, values, strict=True)))
                db.execute(
                    "UPDATE rows SET metric = ?, subset = ?, layer = ?, eps_value = ?, ci_level = ? WHERE rowid = ?",
                    (*(new[c] for c in ("metric", "subset", "layer", "eps_value", "ci_level")), rowid),
                )

    def close(self) -> None:
        self._db.close()
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None

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
            db.execute("DELETE FROM files WHERE cell = ?", (key,))
            db.executemany("INSERT INTO files(cell, path) VALUES (?, ?)", [(key, f) for f in self._files(payload)])

    def missing(self, key: str) -> list[str]:
        """Files (relative to ``artifact_root``) the finished cell ``key`` wrote that are gone: the cell must run
        again. Empty without an ``artifact_root``."""
        if self.artifact_root is None:
            return []
        recorded = [path for (path,) in self._db.execute("SELECT path FROM files WHERE cell = ?", (key,))]
        return [path for path in recorded if not (self.artifact_root / path).exists()]

    def forget(self, keys: Iterable[str]) -> None:
        """Drop the finished cells ``keys`` (their payloads, rows and files records) so they run again."""
        with self._transaction() as db:
            for key in keys:
                for table, column in (("rows", "cell"), ("files", "cell"), ("cells", "key")):
                    db.execute(f"DELETE FROM {table} WHERE {column} = ?", (key,))

    def _files(self, payload: Any) -> list[str]:
        """The artifact files a payload names: every string ``<kind>/...`` (engine.runs.artifacts.KINDS) that is a
        file under ``artifact_root``, or every file inside such a directory."""
        if self.artifact_root is None:
            return []
        files: list[str] = []
        for ref in _strings(payload):
            if ref.split("/", 1)[0] not in KINDS or "/" not in ref:
                continue
            path = self.artifact_root / ref
            found = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] * path.is_file()
            files += [p.relative_to(self.artifact_root).as_posix() for p in found]
        return sorted(set(files))

    def rows(self, keys: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Metric rows in commit order: of the cells ``keys`` (in that order), or of every cell when None."""
        columns = ", ".join(self._columns)
        if keys is None:
            return [self._row(r) for r in self._db.execute(f"SELECT {columns} FROM rows ORDER BY rowid")]
        out = []
        for key in keys:
            cursor = self._db.execute(f"SELECT {columns} FROM rows WHERE cell = ? ORDER BY rowid", (key,))
            out += [self._row(r) for r in cursor]
        return out

    def _row(self, values: Sequence[Any]) -> dict[str, Any]:
        raw = dict(zip(self._columns, values, strict=True))
        return normalise_row(raw) if "subset" in raw else legacy_row(raw)  # an old store opened read-only

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


def legacy_row(raw: dict[str, Any]) -> dict[str, Any]:
    """A row written before the ``subset`` and ``layer`` columns existed, in the current schema: its metric name split
    into (metric, subset, layer) (:func:`engine.runs.schema.legacy_metric`), its ``eps_value`` and, with an interval,
    its ``ci_level``."""
    metric, subset, layer = legacy_metric(raw["metric"], raw.get("detector"))
    interval = raw.get("ci_low") is not None and raw.get("ci_high") is not None
    level = CI_LEVEL if interval else None
    return normalise_row({**raw, "metric": metric, "subset": subset, "layer": layer, "ci_level": level})


def _strings(obj: Any) -> Iterator[str]:
    """Every string value inside a JSON-able object."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _strings(value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from _strings(value)


def _lock(path: Path) -> int:
    """Hold an exclusive flock on ``path`` (recording this pid in it); StoreError naming the holder's pid when
    another process holds it. The lock goes with the descriptor (closed, or the process gone)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StoreError(
            f"run directory {str(path.parent)!r} is in use by another run (pid {holder}); wait for it to finish, "
            "or give this run another name"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _open_writer(path: Path) -> sqlite3.Connection:
    """The store at ``path`` opened for writing (created when absent). A file SQLite cannot read is moved aside to
    ``store.sqlite.corrupt-<time>`` (with its journal files) and StoreError says so: nothing is deleted."""
    db = sqlite3.connect(path, isolation_level=None, timeout=60)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        _check(db)
    except sqlite3.DatabaseError as exc:
        db.close()
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        for suffix in ("", "-wal", "-shm"):
            if Path(f"{path}{suffix}").exists():
                os.replace(f"{path}{suffix}", f"{aside}{suffix}")
        raise StoreError(
            f"results store {str(path)!r} is unreadable ({exc}); moved it aside to {str(aside)!r} (nothing deleted): "
            "rerun to start over with a new store (finished cells run again; artifacts are kept)"
        ) from None
    return db


def _open_readonly(path: Path) -> sqlite3.Connection:
    """The store at ``path`` opened read-only (nothing written, not even a journal: works in a read-only directory);
    StoreError when it is missing or unreadable."""
    if not path.is_file():
        raise StoreError(f"no results store {str(path)!r}: not a run directory, or its store was removed")
    uri = path.resolve().as_uri()
    try:
        try:
            db = sqlite3.connect(f"{uri}?mode=ro", uri=True, isolation_level=None)
            _check(db)
        except sqlite3.OperationalError:  # a read-only directory cannot hold the WAL index: read the file as it is
            db = sqlite3.connect(f"{uri}?immutable=1", uri=True, isolation_level=None)
            _check(db)
        if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'cells'").fetchone() is None:
            raise sqlite3.DatabaseError("no cells table: not a results store, or one still being created")
    except sqlite3.DatabaseError as exc:
        raise StoreError(
            f"results store {str(path)!r} is unreadable ({exc}); `hfc-engine run` with this run's config moves it "
            "aside and starts over"
        ) from None
    return db


def _check(db: sqlite3.Connection) -> None:
    """Raise sqlite3.DatabaseError unless SQLite's quick check of the database passes."""
    result = db.execute("PRAGMA quick_check").fetchone()
    if result is None or result[0] != "ok":
        raise sqlite3.DatabaseError(f"integrity check: {result[0] if result else 'no answer'}")
