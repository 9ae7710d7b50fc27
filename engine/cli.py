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

    path, overrides = args.config, list(args.overrides)
    if path is not None and "=" in path and not Path(path).exists():  # `hfc-engine run key=value ...`
        path, overrides = None, [path, *overrides]
    try:
        config = load_config(path, overrides, quick=args.quick)
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


def cmd_study(args: argparse.Namespace) -> int:
    """Run one of the papers' studies on the embedded data (resumable, with its own report)."""
    from engine.audit import run_audit
    from engine.sweep.config import ConfigError, load_config

    overrides = [f"study.{args.name}.{item}" for item in args.overrides]
    try:
        config = load_config(overrides=[f"name=study-{args.name}", "datasets=[]", f"studies=[{args.name}]", *overrides])
    except ConfigError as exc:
        raise SystemExit(f"config error: {exc}") from None
    report = run_audit(config, progress=not args.no_progress)
    frame = report.frame()
    with pd_options():
        print(frame[["dataset", "model", "attack", "eps", "metric", "value"]].to_string(index=False))
    print(f"report: {report.run_dir / 'report.html'}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """Stream a dataset through a model and fitted detectors; write per-image rows."""
    from engine.data import load_dataset
    from engine.score import score_dataset

    dataset = load_dataset(args.data, **_dataset_options(args))
    summary = score_dataset(
        args.model, args.detectors, dataset, args.out, batch_size=args.batch_size, progress=not args.no_progress
    )
    share = summary.detector_seconds / summary.model_seconds if summary.model_seconds else float("nan")
    print(
        f"scored {summary.rows} images in {summary.seconds:.1f}s ({summary.images_per_second:.1f} images/s); "
        f"model {summary.model_seconds:.1f}s, detectors {summary.detector_seconds:.1f}s "
        f"({100 * share:.0f}% of the model time) -> {summary.output}"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train a model on a dataset's seeded train/val split and save a checkpoint."""
    from engine.data import load_dataset, split_dataset
    from engine.models import train_model

    dataset = load_dataset(args.data, **_dataset_options(args))
    splits = split_dataset(dataset, val=0.15, test=0.15, seed=args.seed)
    out_dir = Path(args.out)
    splits.save(out_dir / "splits.json")
    result = train_model(
        splits,
        args.arch,
        out_dir=out_dir,
        width=args.width,
        dropout=args.dropout,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        balanced=args.balanced,
        progress=not args.no_progress,
    )
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if isinstance(v, float))
    print(f"checkpoint: {result.checkpoint} (best epoch {result.best_epoch}); {metrics}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a model to ONNX (verified against PyTorch with onnxruntime)."""
    from engine.export import export_onnx

    path = export_onnx(args.model, args.out, layers=args.layers, pooled=not args.raw_features)
    print(f"exported and verified: {path}")
    return 0


def _dataset_options(args: argparse.Namespace) -> dict:
    options = {}
    if getattr(args, "image_size", None):
        options["image_size"] = args.image_size
    if getattr(args, "task", None):
        options["task"] = args.task
    return options


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

    study = sub.add_parser("study", help="run one of the papers' studies: stress (paper A) or uap (paper B)")
    study.add_argument("name", choices=["stress", "uap"])
    study.add_argument("overrides", nargs="*", help="study settings, e.g. eps=[0.004] (see docs/studies.md)")
    study.add_argument("--no-progress", action="store_true")
    study.set_defaults(func=cmd_study)

    score = sub.add_parser("score", help="batch-score a dataset with a model and fitted detectors")
    score.add_argument("--model", required=True, help="checkpoint (.pt), TorchScript or ONNX (.onnx) file")
    score.add_argument("--detectors", required=True, nargs="+", help="fitted detector dir(s), searched recursively")
    score.add_argument("--data", required=True, help="dataset spec, e.g. fundus-synth:binary or chest_xray:/path")
    score.add_argument("--out", default="scores.csv", help="output .csv or .parquet (default: scores.csv)")
    score.add_argument("--batch-size", type=int, default=128)
    score.add_argument("--image-size", type=int, help="resize images to this size")
    score.add_argument("--no-progress", action="store_true")
    score.set_defaults(func=cmd_score)

    train = sub.add_parser("train", help="train a classifier on a dataset")
    train.add_argument("--data", required=True, help="dataset spec, e.g. fundus-synth:grade or aptos:/path")
    train.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet50", "vgg16", "vgg16_bn"])
    train.add_argument("--out", default="runs/train", help="output directory (resumes if it holds last.pt)")
    train.add_argument("--width", type=float, default=0.25)
    train.add_argument("--dropout", type=float, default=0.3)
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--balanced", action="store_true", help="class-balanced sampling")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--image-size", type=int)
    train.add_argument("--task", help="task of the dataset (e.g. grade or binary)")
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(func=cmd_train)

    export = sub.add_parser("export", help="export a model to ONNX, verified with onnxruntime")
    export.add_argument("--model", required=True)
    export.add_argument("--out", required=True, help="output .onnx path")
    export.add_argument("--layers", nargs="*", help="also output these layers' features (names or globs)")
    export.add_argument("--raw-features", action="store_true", help="raw feature maps instead of GAP vectors")
    export.set_defaults(func=cmd_export)

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
