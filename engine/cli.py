"""The ``hfc-engine`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

BENCH_MODULES = ("bench_gmm", "bench_mahalanobis", "bench_knn", "bench_kde")
BENCH_COLUMNS = ("op", "shape", "ours_s", "baseline", "baseline_s", "speedup", "gflops", "gemm_multiple")


def _benchmarks_dir() -> Path:
    here = Path(__file__).resolve().parent.parent / "benchmarks"
    if not (here / "harness.py").exists():
        raise SystemExit(
            "hfc-engine bench needs a source checkout (benchmarks/ beside engine/); "
            "install with `pip install -e .` from the repository"
        )
    return here


def _load_bench(name: str):
    path = _benchmarks_dir() / f"{name}.py"
    sys.path.insert(0, str(path.parent))  # so the module can import its sibling harness.py
    spec = importlib.util.spec_from_file_location(f"hfc_benchmarks.{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the kernel benchmark suite and print its table."""
    import pandas as pd

    rows = []
    for name in args.ops or BENCH_MODULES:
        if name not in BENCH_MODULES:
            raise SystemExit(f"--ops: unknown benchmark {name!r}; choose from {list(BENCH_MODULES)}")
        rows.extend(_load_bench(name).run(quick=args.quick))
    table = pd.DataFrame(rows)
    cols = [c for c in BENCH_COLUMNS if c in table.columns]
    print(table[cols].to_string(index=False))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run (or resume) an audit and print its summary."""
    from engine.audit import run_audit
    from engine.report.audit_report import summary_lines
    from engine.sweep.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides, quick=args.quick)
    except ConfigError as exc:
        raise SystemExit(f"config error: {exc}") from None
    report = run_audit(config, progress=not args.no_progress)
    table = report.table()
    if not table.empty:
        with pd_options():
            print(table.round(3).to_string())
    for line in summary_lines(report.rows):
        print(line)
    print(f"report: {report.run_dir / 'report.html'}")
    return 0


def pd_options():
    import pandas as pd

    return pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_rows", 500)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfc-engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run (or resume) an audit; no config = the default audit on embedded data")
    run.add_argument("config", nargs="?", help="YAML config (merged over the defaults)")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. attack.steps=40")
    run.add_argument("--quick", action="store_true", help="fewer images, one eps, BIM/PGD only")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.set_defaults(func=cmd_run)

    bench = sub.add_parser("bench", help="run the kernel benchmark suite and print the table")
    bench.add_argument("--quick", action="store_true", help="smaller shapes, fewer repeats")
    bench.add_argument("--ops", nargs="*", help=f"subset of {list(BENCH_MODULES)}")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
