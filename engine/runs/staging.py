"""Where a run's artifacts live: a directory (the default, ``<run dir>/artifacts``; on a cluster, a shared
filesystem), or object storage named by an fsspec URL (``s3://bucket/runs/x``, ``gs://...``, ``file:///...``).

Stages write through many writers of other packages (AdvWriter, save_hfc_gmms, Detector.save, torch.save), all
of which want local paths. So an fsspec location is *staged*: each process works in a local cache directory laid
out like the location, and :class:`StagedArtifacts`

- downloads what a payload reference names the first time it is resolved (:meth:`path`: a file, such as a
  checkpoint without its training state, or a whole cell directory ``<kind>/<label>-<key>``, such as an
  adversarial set), and a whole cell directory when a cell opens it to write (:meth:`directory`: a trained model
  found again, an attack resumed); then serves them from the cache for the rest of the process;
- uploads every file written in the cache when a cell finishes (:meth:`publish`, called by the executor before
  the cell is committed), oldest first, each to a temporary name renamed into place: a partial upload never holds
  a truncated file, and an index written after its data (an adversarial set's manifest) never names a missing
  shard.

A worker therefore reads its dependencies from the location, never from the driver's disk. The cache is one
directory per process under the system's temporary directory, removed when the process exits (or, for a
process that was killed, by the next process that opens a location on that machine).
"""

from __future__ import annotations

import atexit
import os
import posixpath
import shutil
import tempfile
from pathlib import Path, PurePosixPath

from engine.runs.artifacts import Artifacts
from engine.runs.schema import fingerprint

CACHE_ROOT = Path(tempfile.gettempdir()) / "hfc-engine-artifacts"


def is_url(location: str) -> bool:
    return "://" in location


def open_artifacts(location: str) -> Artifacts:
    """The artifacts at ``location``: a directory, or an fsspec URL (staged through a local cache)."""
    return StagedArtifacts(location) if is_url(location) else Artifacts(location)


class StagedArtifacts(Artifacts):
    """Artifacts at an fsspec URL, worked on in a per-process local cache (see the module docstring)."""

    def __init__(self, url: str, cache: str | os.PathLike[str] | None = None) -> None:
        import fsspec  # fsspec (a torch dependency) costs 0.1 s to import: only runs with a URL location pay it

        self.url = url
        self.fs, remote = fsspec.core.url_to_fs(url)
        self.remote = remote.rstrip("/")
        if cache is None:
            _remove_stale_caches()
            cache = CACHE_ROOT / f"{fingerprint(url)}-{os.getpid()}"
            atexit.register(shutil.rmtree, cache, True)
        super().__init__(cache)
        self.root.mkdir(parents=True, exist_ok=True)
        self._pulled: set[str] = set()  # cell directories (relative to the root) already looked up remotely
        self._synced: dict[str, tuple[int, int]] = {}  # file (relative) -> (size, mtime_ns) as the location has it

    def directory(self, kind: str, label: str, key: str) -> Path:
        path = super().directory(kind, label, key)
        self._pull(path.relative_to(self.root).as_posix())
        return path

    def path(self, ref: str) -> Path:
        parts = PurePosixPath(ref).parts
        cell_directory = "/".join(parts[:2])
        if not (Path(ref).is_absolute() or ref in self._synced or cell_directory in self._pulled):
            if len(parts) > 2 and self.fs.isfile(f"{self.remote}/{ref}"):
                self._fetch(ref)  # one file: a checkpoint, without the training state beside it
            else:
                self._pull(cell_directory)
        return super().path(ref)

    def publish(self) -> None:
        """Upload every file of the cache the location does not have yet, oldest first."""
        changed = []
        for path in self.root.rglob("*"):
            if path.is_file() and not _temporary(path.name):
                rel, stat = path.relative_to(self.root).as_posix(), path.stat()
                if self._synced.get(rel) != (stat.st_size, stat.st_mtime_ns):
                    changed.append((stat.st_mtime_ns, rel, (stat.st_size, stat.st_mtime_ns)))
        for _, rel, state in sorted(changed):
            target = f"{self.remote}/{rel}"
            partial = f"{target}.{os.getpid()}.partial"
            self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
            self.fs.put_file(str(self.root / rel), partial)
            self.fs.mv(partial, target)
            self._synced[rel] = state

    def _pull(self, rel: str) -> None:
        """Download the cell directory ``rel`` (``<kind>/<name>``) once per process, if the location has it."""
        if rel in self._pulled:
            return
        remote = f"{self.remote}/{rel}"
        for source in self.fs.find(remote) if self.fs.isdir(remote) else []:
            name = _relative(source, self.remote)
            if not name.endswith(".partial") and name not in self._synced:
                self._fetch(name)
        self._pulled.add(rel)

    def _fetch(self, name: str) -> None:
        """Download one file (relative to the root) into the cache, atomically."""
        local = self.root / name
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{os.getpid()}.tmp")
        self.fs.get_file(f"{self.remote}/{name}", str(tmp))
        os.replace(tmp, local)
        stat = local.stat()
        self._synced[name] = (stat.st_size, stat.st_mtime_ns)


def _remove_stale_caches() -> None:
    """Delete the caches of processes that no longer run (Ray kills idle workers without running atexit)."""
    for cache in CACHE_ROOT.glob("*-*"):
        pid = cache.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(cache, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _temporary(name: str) -> bool:
    """Files of a write in progress (engine.fileio.atomic_write, AdvWriter): never uploaded."""
    return name.startswith(".") and name.endswith(".tmp")


def _relative(path: str, root: str) -> str:
    path, root = path.strip("/"), root.strip("/")
    return path[len(root) :].lstrip("/") if root else path
