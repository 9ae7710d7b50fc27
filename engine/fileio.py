"""Crash-safe file writing shared by every part that persists user work (caches, checkpoints, run stores), a
resumable table writer (batch scoring), and the content hash of user files (what a run's cells are keyed by)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from engine.errors import UserError


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then fsync and rename onto ``path``: readers see the old file or the whole new one;
    the directory is fsynced after the rename, so a power loss does not forget the new name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
    fsync_directory(path.parent)
    return path


def fsync_directory(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (names created, renamed or removed in it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}  # (path, size, mtime_ns, ctime_ns, inode) -> sha256


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 (hex) of a file's bytes, read once per process while its size, times and inode stay the same (a
    rewrite, rename onto it or ``cp -p`` changes ctime or the inode, so a changed file is always read again)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
    if key not in _DIGESTS:
        with open(path, "rb") as fh:
            _DIGESTS[key] = hashlib.file_digest(fh, "sha256").hexdigest()
    return _DIGESTS[key]


class ResumeError(UserError):
    """An unfinished job at an output was started with other settings (data, model, ...) than the rerun."""


class ResumableTable:
    """The rows of one job as numbered Parquet parts in ``.<output name>.parts/`` (each written whole, see
    :func:`atomic_write`, so a killed job leaves only whole parts), joined into ``output`` (``.csv`` or
    ``.parquet``) by :meth:`finish`. ``job.json`` there holds the job's settings: a rerun with the same settings
    continues after the parts present; a rerun with other settings is refused, naming what changed."""

    def __init__(self, output: Path, job: Mapping[str, Any]) -> None:
        self.output, self.dir = output, output.with_name(f".{output.name}.parts")
        self.paths: list[Path] = []
        job = json.loads(json.dumps(dict(job)))  # as it reads back from job.json
        if self.dir.exists():
            recorded = json.loads((self.dir / "job.json").read_text())
            changed = [key for key in dict.fromkeys([*recorded, *job]) if recorded.get(key) != job.get(key)]
            if changed:
                what = "; ".join(f"{k} {_short(recorded.get(k))} -> {_short(job.get(k))}" for k in changed)
                raise ResumeError(
                    f"output {str(output)!r} has an unfinished job with other settings ({what}): rerun that job to "
                    f"continue it, or delete {str(self.dir)!r} to start over"
                )
            self.paths = sorted(self.dir.glob("part-*.parquet"))
        else:
            self.dir.mkdir(parents=True)
            atomic_write(self.dir / "job.json", lambda tmp: tmp.write_text(json.dumps(job)))

    @property
    def rows(self) -> int:
        """Rows in the finished parts."""
        import pyarrow.parquet as pq

        return sum(pq.read_metadata(p).num_rows for p in self.paths)

    def write(self, frame: Any) -> None:
        """Append a pandas DataFrame as the next part."""
        path = atomic_write(
            self.dir / f"part-{len(self.paths):06d}.parquet", lambda tmp: frame.to_parquet(tmp, index=False)
        )
        self.paths.append(path)

    def finish(self) -> Path:
        """Join the parts into the output and remove them."""
        import pyarrow.parquet as pq

        def join(tmp: Path) -> None:
            if self.output.suffix == ".csv":
                with open(tmp, "w", newline="") as fh:
                    for i, path in enumerate(self.paths):
                        pq.read_table(path).to_pandas().to_csv(fh, header=i == 0, index=False)
                return
            with pq.ParquetWriter(tmp, pq.read_schema(self.paths[0])) as writer:
                for path in self.paths:
                    writer.write_table(pq.read_table(path))

        atomic_write(self.output, join)
        shutil.rmtree(self.dir)
        return self.output


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
