"""What each ``hfc-engine`` command does, and the arguments it takes.

engine.cli parses the command line and turns errors into exit codes; it imports this module (and so torch and the
engine) only once a command is parsed, which keeps ``hfc-engine --help`` and ``--version`` fast. Each command is a
``cmd_<name>(args)`` function and the arguments :data:`ARGUMENTS` adds to its parser.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
import yaml

from engine.auditing import run_audit
from engine.bench import OPS, run_table
from engine.data import load_dataset, split_dataset
from engine.detectors import FPRS, Detector, fitted_checkpoint
from engine.errors import UserError
from engine.export import export_onnx
from engine.models import OUTPUT_KINDS, TrainConfig, feature_points, input_shape, layer_shapes, load_model, train_model
from engine.models.classifier import ARCHITECTURES
from engine.report import summary_lines
from engine.runs import QUICK, STUDIES, choices, load_config
from engine.runs.catalog import catalog, locate, select
from engine.score import RUNTIMES, calibrate, check_output, score_dataset

BENCH_COLUMNS = ("op", "shape", "ours_s", "baseline", "baseline_s", "speedup", "gflops", "gemm_multiple")
DEFAULT_INPUT = (3, 224, 224)  # `layers` input shape when neither --input-size nor the model records one
PRESETS_PACKAGE = "engine.presets"  # configs/*.yaml, installed with the package (setup.py)


def cmd_run(args: argparse.Namespace) -> int:
    """Run (or resume) an audit and print its summary."""
    paths, overrides = [], []
    for item in args.items:  # configs and presets are merged left to right, then the overrides
        if "=" in item and not Path(item).exists():
            overrides.append(item)
        elif overrides:
            raise UserError(f"config {item!r} comes after an override; put configs and presets first")
        else:
            paths.append(config_path(item))
    if args.device:
        overrides.append(f"device={args.device}")
    if args.executor or args.address:  # --address alone means a Ray run
        overrides.append(f"executor={args.executor or 'ray'}")
    if args.address:
        overrides.append(f"ray.address={args.address}")
    report = run_audit(load_config(paths, overrides, quick=args.quick), progress=not args.no_progress)
    table = report.table()
    if not table.empty:
        with _wide():
            print(table.round(3).to_string())
    for line in summary_lines(report.result):
        print(line)
    print(f"report: {report.run_dir / 'report.html'}")
    return 0


def run_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument(
        "items", nargs="*", metavar="CONFIG|KEY=VALUE",
        help=f"YAML configs or presets {list(presets())}, merged over the defaults left to right (e.g. 'clinical "
        "audit.yaml'), then dotted overrides, e.g. attack.steps=40 (see docs/runs.md)",
    )  # fmt: skip
    run.add_argument("--quick", action="store_true", help=_quick_help())
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    device_option(run, None, "torch device of every model, e.g. cuda (default: the config's device, cpu)")
    run.add_argument("--executor", choices=choices()["executor"], help="where cells run (default: the config's)")
    run.add_argument("--address", help="Ray cluster to run on: auto or <head host>:<port> (implies --executor ray)")
    run.set_defaults(func=cmd_run)


def presets() -> dict[str, Path]:
    """The shipped configs (configs/*.yaml) by name: installed as the package data ``engine.presets``, or read from
    the checkout's configs/ when hfc-engine runs from a source tree that was not installed."""
    spec = importlib.util.find_spec(PRESETS_PACKAGE)
    folders = [Path(p) for p in spec.submodule_search_locations or []] if spec else []
    folders.append(Path(__file__).resolve().parent.parent / "configs")
    folder = next((f for f in folders if f.is_dir()), None)
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder else {}


def config_path(config: str) -> Path:
    """``run``'s config argument: a YAML file, or the name of a shipped preset (``paper`` or ``paper.yaml``)."""
    path = Path(config)
    if path.is_file():
        return path
    shipped = presets()
    name = path.name.removesuffix(".yaml")
    if path.parent == Path(".") and name in shipped:
        return shipped[name]
    raise UserError(f"config {config!r} is neither a YAML file nor a preset; presets: {sorted(shipped)}")


def cmd_study(args: argparse.Namespace) -> int:
    """Run one of the papers' studies on the embedded data (resumable, with its own report)."""
    overrides = [f"study.{args.name}.{item}" for item in args.overrides]
    config = load_config(overrides=[f"name=study-{args.name}", "datasets=[]", f"studies=[{args.name}]", *overrides])
    report = run_audit(config, progress=not args.no_progress)
    with _wide():
        columns = ["dataset", "model", "attack", "eps", "metric", "subset", "layer", "value"]
        print(report.frame()[columns].to_string(index=False))
    print(f"report: {report.run_dir / 'report.html'}")
    return 0


def study_arguments(study: argparse.ArgumentParser) -> None:
    study.description = "run one of the papers' studies: " + "; ".join(f"{n}: {s.title}" for n, s in STUDIES.items())
    study.add_argument("name", choices=list(STUDIES), help="the study")
    study.add_argument("overrides", nargs="*", help="study settings, e.g. eps=[0.004] (see docs/studies.md)")
    study.add_argument("--no-progress", action="store_true", help="no progress bars")
    study.set_defaults(func=cmd_study)


def cmd_score(args: argparse.Namespace) -> int:
    """Stream a dataset through a model and fitted detectors; write per-image rows and the thresholds used."""
    check_output(args.out)  # before the data is read
    dataset = load_dataset(args.data, **_dataset_options(args))
    summary = score_dataset(
        args.model,
        args.detectors,
        dataset,
        args.out,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        fpr=args.fpr or [0.05],
        calibration=args.calibration,
        select=args.select,
        runtime=args.runtime,
        allow_model_mismatch=args.allow_model_mismatch,
        allow_size_mismatch=args.allow_size_mismatch,
        device=args.device,
    )
    model_s = summary.model_seconds or float("nan")
    resumed = f" (continuing after {summary.resumed} rows already written)" if summary.resumed else ""
    print(
        f"scored {summary.rows - summary.resumed} images{resumed} in {summary.seconds:.1f}s "
        f"({summary.images_per_second:.1f} images/s); model ({summary.runtime}) {summary.model_seconds:.1f}s, "
        f"detectors {summary.detector_seconds:.1f}s ({100 * summary.detector_seconds / model_s:.0f}% of the model "
        f"time: {', '.join(f'{k} {100 * v / model_s:.0f}%' for k, v in summary.per_detector.items())}) "
        f"-> {summary.output}"
    )
    print(f"thresholds (score > threshold is flagged) -> {summary.thresholds_file}")
    for threshold in summary.thresholds:
        print(f"  {threshold}")
    return 0


def score_arguments(score: argparse.ArgumentParser) -> None:
    score.add_argument("--model", required=True, help="checkpoint (.pt), TorchScript or ONNX (.onnx) file")
    scoring_options(score)
    score.add_argument("--out", default="scores.csv", help="output .csv or .parquet (default: scores.csv)")
    score.add_argument(
        "--fpr", type=float, nargs="+", action="extend", metavar="RATE",
        help="flag at these clean false-positive rates in (0, 1), a list or repeated (default: 0.05)",
    )  # fmt: skip
    score.add_argument(
        "--calibration", default="latest",
        help="clean scores the thresholds come from: latest (the newest calibration, else the fit's), fit, or a "
        "calibration's name",
    )  # fmt: skip
    score.set_defaults(func=cmd_score)


def scoring_options(parser: argparse.ArgumentParser) -> None:
    """The options ``score`` and ``calibrate`` share."""
    parser.add_argument(
        "--detectors", required=True, nargs="+", help="fitted detector dir(s), searched recursively, or run dir(s)"
    )
    parser.add_argument("--select", metavar="PATTERN", help="a run's detectors by key glob, e.g. 'fundus*/pgd/8-256/*'")
    parser.add_argument("--data", required=True, help="dataset spec, e.g. fundus-synth:binary or chest_xray:/path")
    parser.add_argument("--batch-size", type=int, default=128, help="images per forward pass")
    parser.add_argument(
        "--image-size",
        type=int,
        help="resize images to this size (the detectors' fit size unless --allow-size-mismatch)",
    )
    parser.add_argument(
        "--runtime", choices=RUNTIMES, default="auto", help="forward pass in (auto: onnxruntime for an export)"
    )
    parser.add_argument(
        "--allow-model-mismatch", action="store_true", help="score with a model the detectors were not fitted on"
    )
    parser.add_argument(
        "--allow-size-mismatch", action="store_true", help="score images of another size than the detectors' fit"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    device_option(parser, "cpu", "torch device of the model and detectors")


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Reset detectors' thresholds on a site's own clean images: save their scores beside each detector."""
    dataset = load_dataset(args.data, **_dataset_options(args))
    thresholds = calibrate(
        args.model,
        args.detectors,
        dataset,
        source=args.data,
        fpr=args.fpr or FPRS,
        select=args.select,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        runtime=args.runtime,
        allow_model_mismatch=args.allow_model_mismatch,
        allow_size_mismatch=args.allow_size_mismatch,
        device=args.device,
    )
    print(
        f"calibrated on {len(dataset)} clean images of {args.data}: saved beside each detector in calibrations/ "
        "(score reads the newest; --calibration fit for the fit's own)"
    )
    for threshold in thresholds:
        print(f"  {threshold}")
    return 0


def calibrate_arguments(calib: argparse.ArgumentParser) -> None:
    calib.add_argument("--model", help="model file (default: the one --detectors were fitted on)")
    scoring_options(calib)
    calib.add_argument(
        "--fpr", type=float, nargs="+", action="extend", metavar="RATE",
        help=f"report thresholds at these rates (default: {' '.join(map(str, FPRS))}); any rate works later",
    )  # fmt: skip
    calib.set_defaults(func=cmd_calibrate)


def cmd_runs_show(args: argparse.Namespace) -> int:
    """List a run's fitted detectors by key, with their AUROC in the audit and their directories."""
    entries = select(args.run_dir, args.select) if args.select else catalog(args.run_dir)
    print(f"{len(entries)} fitted detectors in {args.run_dir}: fitted on plain AEs, AUROC on successful AEs (95% CI)")
    if not entries:
        return 0
    table = [("key", "auroc", "auroc_hfc", "path")]
    table += [(e.key, str(e.auroc or "-"), str(e.auroc_hfc or "-"), str(e.path)) for e in entries]
    widths = [max(map(len, column)) for column in zip(*table, strict=True)]
    for row in table:
        print("  ".join(f"{cell:<{width}}" for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def runs_arguments(runs: argparse.ArgumentParser) -> None:
    group = runs.add_subparsers(dest="runs_command", required=True)
    show = runs.add_command(group, "show", "list a run's fitted detectors by key, with AUROC and path")
    show.add_argument("run_dir", help="run directory, e.g. runs/default")
    show.add_argument("--select", metavar="PATTERN", help="only keys matching this glob, e.g. '*/*/pgd/8-256/kd'")
    show.set_defaults(func=cmd_runs_show)


def cmd_train(args: argparse.Namespace) -> int:
    """Train a model on a dataset's seeded train/val split and save a checkpoint."""
    dataset = load_dataset(args.data, **_dataset_options(args))
    splits = split_dataset(dataset, val=0.15, test=0.15, seed=args.seed)
    out_dir = Path(args.out)
    splits.save(out_dir / "splits.json")
    config = TrainConfig(
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed, balanced=args.balanced
    )
    result = train_model(
        splits, args.arch, config, out_dir, width=args.width, dropout=args.dropout, progress=not args.no_progress
    )
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics["val"].items() if isinstance(v, float))
    print(f"checkpoint: {result.checkpoint} (best epoch {result.best_epoch}); validation {metrics}")
    return 0


def train_arguments(train: argparse.ArgumentParser) -> None:
    train.add_argument("--data", required=True, help="dataset spec, e.g. fundus-synth:grade or aptos:/path")
    train.add_argument("--arch", default="resnet18", choices=list(ARCHITECTURES), help="architecture")
    train.add_argument("--out", default="runs/train", help="output directory (resumes if it holds last.pt)")
    train.add_argument("--width", type=float, default=0.25, help="channel width multiplier (1 = the standard model)")
    train.add_argument("--dropout", type=float, default=0.3, help="dropout before the classifier (BU needs > 0)")
    train.add_argument("--epochs", type=int, default=10, help="training epochs")
    train.add_argument("--lr", type=float, default=3e-3, help="learning rate")
    train.add_argument("--batch-size", type=int, default=64, help="images per training step")
    train.add_argument("--balanced", action="store_true", help="class-balanced sampling")
    train.add_argument("--seed", type=int, default=0, help="seed of the split, the initial weights and the order")
    train.add_argument("--image-size", type=int, help="resize images to this size (default: the dataset's)")
    train.add_argument("--task", help="task of the dataset (e.g. grade or binary)")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    device_option(train, "cpu", "torch device to train on")
    train.set_defaults(func=cmd_train)


def cmd_export(args: argparse.Namespace) -> int:
    """Export a model to ONNX (verified against PyTorch with onnxruntime)."""
    dirs = [entry.path for entry in locate(args.detectors)] if args.detectors else []
    if args.model is None and not dirs:
        raise UserError("export: give --model, or --detectors to export the model they were fitted on")
    model = args.model or fitted_checkpoint(dirs)
    detectors = [Detector.load(d) for d in dirs]
    path = export_onnx(
        model, args.out, layers=args.layers, pooled=not args.raw_features, dropout=args.dropout,
        detectors=detectors,
    )  # fmt: skip
    print(f"exported and verified: {path}")
    return 0


def export_arguments(export: argparse.ArgumentParser) -> None:
    export.add_argument("--model", help="model file (default: the one --detectors were fitted on)")
    export.add_argument("--out", required=True, help="output .onnx path")
    export.add_argument("--layers", nargs="*", help="also output these layers' features (names or globs)")
    export.add_argument("--raw-features", action="store_true", help="raw feature maps instead of GAP vectors")
    export.add_argument("--dropout", action="store_true", help="mark the dropout layers (BU's MC-dropout passes)")
    export.add_argument("--detectors", nargs="*", help="fitted detector dir(s): add the outputs they need")
    export.set_defaults(func=cmd_export)


def cmd_layers(args: argparse.Namespace) -> int:
    """List a model's feature points (names for hfc.layers / detector.layers globs), their kinds and shapes."""
    convention = {"layout": args.layout, "range": args.range, "size": args.input_size}
    model = load_model(args.model, input={k: v for k, v in convention.items() if v is not None}, output=args.output)
    model.to(args.device)
    shape = args.input_size or input_shape(model) or DEFAULT_INPUT
    points = feature_points(model)
    shapes = layer_shapes(model, list(points), shape)
    print(f"{len(points)} layers of {args.model} for (C, H, W) = {tuple(shape)} inputs:")
    width = max((len(name) for name in points), default=0)
    for name, point in points.items():
        print(f"{name:<{width}}  {'+'.join(sorted(point.kinds)):<22}  {shapes[name]}")
    return 0


def layers_arguments(layers: argparse.ArgumentParser) -> None:
    layers.add_argument("--model", required=True, help="checkpoint (.pt), ONNX (.onnx) or TorchScript file")
    layers.add_argument(
        "--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
        help=f"input shape (default: the model's own, else {' '.join(map(str, DEFAULT_INPUT))})",
    )  # fmt: skip
    layers.add_argument("--layout", choices=["NCHW", "NHWC"], help="layout the model file takes (default: NCHW)")
    layers.add_argument("--range", type=float, nargs=2, metavar=("LOW", "HIGH"), help="input values (default: 0 1)")
    layers.add_argument("--output", default="logits", choices=OUTPUT_KINDS, help="what the model returns")
    device_option(layers, "cpu", "torch device to run the model on")
    layers.set_defaults(func=cmd_layers)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the kernel benchmark suite and print its table."""
    table = pd.DataFrame(run_table(args.ops, quick=args.quick))
    print(table[[c for c in BENCH_COLUMNS if c in table.columns]].to_string(index=False))
    return 0


def bench_arguments(bench: argparse.ArgumentParser) -> None:
    bench.add_argument("--quick", action="store_true", help="smaller shapes, fewer repeats")
    bench.add_argument("--ops", nargs="*", choices=OPS, help=f"subset of {list(OPS)} (default: all)")
    bench.set_defaults(func=cmd_bench)


def _dataset_options(args: argparse.Namespace) -> dict:
    options = {}
    if getattr(args, "image_size", None):
        options["image_size"] = args.image_size
    if getattr(args, "task", None):
        options["task"] = args.task
    return options


def _wide() -> pd.option_context:
    return pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_rows", 500)


def device(value: str) -> str:
    """``--device``: a torch device this machine has (cpu, cuda, cuda:1, mps...)."""
    try:
        parsed = torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    backend = getattr(torch, parsed.type, None)
    if parsed.type != "cpu" and not (backend is not None and backend.is_available()):
        raise argparse.ArgumentTypeError(f"{value!r}: this torch {torch.__version__} sees no {parsed.type} device")
    if parsed.index is not None and parsed.type != "cpu" and parsed.index >= backend.device_count():
        raise argparse.ArgumentTypeError(f"{value!r}: only {backend.device_count()} {parsed.type} device(s) visible")
    return value


def device_option(parser: argparse.ArgumentParser, default: str | None, help_text: str) -> None:
    """``--device``, checked against the devices this machine has."""
    parser.add_argument("--device", type=device, default=default, help=help_text)


def _quick_help() -> str:
    settings = yaml.safe_dump(QUICK, default_flow_style=True, width=10**6).strip()
    return f"a short audit: merge {settings} over the defaults (then the config file and overrides)"


ARGUMENTS: dict[str, Callable[[argparse.ArgumentParser], None]] = {  # command -> what adds its arguments
    "run": run_arguments,
    "study": study_arguments,
    "score": score_arguments,
    "calibrate": calibrate_arguments,
    "runs": runs_arguments,
    "train": train_arguments,
    "export": export_arguments,
    "layers": layers_arguments,
    "bench": bench_arguments,
}
