"""Names the documentation cites exist: every ``engine.*`` dotted name in docs/*.md, README.md and the docstrings
resolves (import the module, getattr the rest), and no file of the repository cites a file outside it."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE_NAME = re.compile(r"(?<![\w.-])engine(?:\.\w+)+")
MARKDOWN_FILE = re.compile(r"[\w./-]*[\w-]\.md\b")
# A relative path climbing out of the citing file's directory (not one inside a longer path, e.g. $ORIGIN/../lib).
PARENT_PATH = re.compile(r"(?<![\w./$])(?:\.\./)+[\w./-]*")
# Absolute paths into a machine's checkouts or home directories (never part of a clone elsewhere).
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|check|home|root|Users)/[\w./-]*")


def tracked_files() -> list[Path]:
    """The repository's files: git's list in a checkout, else every file under the root but caches."""
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return [ROOT / line for line in out.splitlines() if (ROOT / line).is_file()]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", "build", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", ".benchmarks"}
        return [p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]


def text_of(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # binary (images, compiled extensions)


def docstrings(path: Path) -> Iterator[tuple[int, str]]:
    """(first line number, text) of the module, class and function docstrings of a Python file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                if isinstance(first.value.value, str):
                    yield first.lineno, first.value.value


def cited_names() -> Iterator[tuple[str, int, str]]:
    """(file relative to the root, line, name) of every ``engine.*`` name in the docs and the docstrings."""
    for path in tracked_files():
        rel = path.relative_to(ROOT).as_posix()
        if rel == "README.md" or (rel.startswith("docs/") and rel.endswith(".md")):
            chunks = [(1, path.read_text(encoding="utf-8"))]
        elif rel.endswith(".py"):
            chunks = list(docstrings(path))
        else:
            continue
        for first_line, text in chunks:
            for number, line in enumerate(text.splitlines(), start=first_line):
                for match in ENGINE_NAME.finditer(line):
                    yield rel, number, match.group()


def resolve(name: str) -> str | None:
    """None when ``name`` resolves, else why not. A submodule wins over a package attribute of the same name
    (``engine.models.evaluate`` the module, not the function it exports); attributes are looked up on modules,
    classes (dataclass fields count) and objects. A module whose optional dependency is missing here (triton,
    ray, a CUDA build) counts as resolved when its file exists."""
    parts = name.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        prefix = ".".join(parts[: i + 1])
        if hasattr(obj, "__path__") and importlib.util.find_spec(prefix) is not None:
            try:
                obj = importlib.import_module(prefix)
            except ImportError as exc:
                if exc.name and not exc.name.startswith(prefix):
                    return None  # the module exists; an optional dependency of it is not installed here
                raise
        elif hasattr(obj, part):
            obj = getattr(obj, part)
        elif dataclasses.is_dataclass(obj) and part in {f.name for f in dataclasses.fields(obj)}:
            return None  # a field without a class-level default; nothing below it to check
        else:
            return f"{'.'.join(parts[:i])} has no attribute {part!r}"
    return None


def test_every_cited_engine_name_resolves():
    cache: dict[str, str | None] = {}
    failures = []
    for rel, line, name in cited_names():
        if name not in cache:
            cache[name] = resolve(name)
        if cache[name] is not None:
            failures.append(f"{rel}:{line}: {name} ({cache[name]})")
    assert len(cache) > 100, f"only {len(cache)} distinct engine.* names found: is the scan broken?"
    assert not failures, "stale engine.* names:\n" + "\n".join(failures)


def outside_citations(path: Path, text: str, tracked: set[str]) -> Iterator[tuple[int, str]]:
    """(line, citation) of the files ``text`` cites that are not in the repository."""
    here = path.parent
    for number, line in enumerate(text.splitlines(), start=1):
        for match in PARENT_PATH.finditer(line):
            target = (here / match.group()).resolve()
            if not target.is_relative_to(ROOT):
                yield number, match.group()
        for match in MACHINE_PATH.finditer(line):
            yield number, match.group()
        for match in MARKDOWN_FILE.finditer(line):
            cited = match.group().lstrip("./")
            if not any(t == cited or t.endswith("/" + cited) for t in tracked):
                yield number, match.group()


def test_no_file_cites_a_file_outside_the_repository():
    files = tracked_files()
    tracked = {p.relative_to(ROOT).as_posix() for p in files}
    failures = []
    for path in files:
        text = text_of(path)
        if text is not None:
            rel = path.relative_to(ROOT).as_posix()
            failures += [f"{rel}:{line}: {cited}" for line, cited in outside_citations(path, text, tracked)]
    assert not failures, "citations of files outside the repository:\n" + "\n".join(failures)


def test_the_citation_checks_catch_what_they_are_for(tmp_path):
    """The scanners flag a parent-directory escape, a machine path and a missing markdown file (built here, so
    this file itself cites nothing outside)."""
    escape, machine, missing = "../" * 3 + "notes/x.txt", "/" + "work/x/y.py", "PLAN" + ".md"
    text = f"see {escape}\nsee {machine}\nsee {missing} and docs/runs.md\n"
    found = list(outside_citations(ROOT / "docs" / "runs.md", text, {"docs/runs.md"}))
    assert found == [(1, escape), (2, machine), (3, missing)]
    assert resolve("engine.ops.gmm_log_prob") is None
    assert "has no attribute 'metrics'" in resolve("engine.models.metrics")
    assert "has no attribute" in resolve("engine.ops.gmm_log_prob.nothing")
