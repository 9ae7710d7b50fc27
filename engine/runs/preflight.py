"""Open the user's files before any work: a run's pre-flight check (engine.runs.run.execute calls it first).

Datasets on disk: the path exists; a CSV is UTF-8 with its columns and no empty label
(engine.data.loaders.csv_table); image files open (headers only) and share one size unless ``image_size`` is set.
User models (``model.checkpoint``): the file loads (format, readability, conversion), takes a probe batch shaped
like the data, and returns what ``model.output`` declares. Each failure is one :class:`UserError` naming the file,
before any data is generated, any model trained or anything is written in the run directory. Nothing here decodes
a whole dataset: the ``data`` cell does that, and the model loaded here is the one the ``model`` cell uses
(RunContext.open_user_model).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from engine.data import LOADERS, SYNTHETIC, loader_kind, synthetic
from engine.data.image import header_size, parse_size
from engine.data.loaders import csv_table, source_files
from engine.errors import UserError
from engine.runs.context import MEMORY, RunContext, user_model_spec
from engine.runs.plan import model_configs, model_label

log = logging.getLogger("engine.runs")
PROBE_IMAGES = 2  # images in the probe batch a user's model is checked on
PROBABILITY_TOLERANCE = 1e-3  # |sum of a probe row's probabilities - 1| beyond this: not probabilities


def preflight(config: Mapping[str, Any], context: RunContext) -> None:
    """Check every dataset and user model of ``config`` (see the module docstring); raise UserError on the first
    problem."""
    shapes = [dataset_shape(i, spec) for i, spec in enumerate(config["datasets"])]
    if config["hfc"]["enabled"]:
        for i, spec in enumerate(config["datasets"]):
            check_components(config, i, spec)
    for model_cfg in model_configs(config):
        checkpoint = model_cfg.get("checkpoint")
        if not checkpoint or str(checkpoint).startswith(MEMORY):
            continue
        for shape in dict.fromkeys(shapes):
            check_model(context, model_cfg, model_label(model_cfg), shape)


def dataset_shape(index: int, spec: Mapping[str, Any]) -> tuple[int, int, int] | None:
    """The (C, H, W) of the images dataset spec ``index`` gives, after checking its files; None where it cannot be
    told without loading (in-memory data, MedMNIST arrays)."""
    name = str(spec.get("kind") or spec["name"])
    size = parse_size(spec.get("image_size"))
    if name in SYNTHETIC:
        side = size or (64, 64)
        return (int(spec.get("channels") or SYNTHETIC[name].channels), *side)
    kind, path = loader_kind(name), spec.get("path") or spec.get("root")
    if kind not in LOADERS or kind in ("arrays", "medmnist"):
        return None
    if path is None:
        raise UserError(f"datasets.{index}: loader {kind!r} needs a 'path'")
    root = Path(str(path)).expanduser()
    if not root.exists():
        raise UserError(f"datasets.{index}.path {str(path)!r} does not exist")
    if kind == "image_csv":
        files = csv_table(root, **csv_options(spec))[0]
    else:
        files = [file for _, file in source_files(root) if file.suffix.lower() != ".csv"]
    if kind == "aptos" and spec.get("crop", True) and size is None:
        raise UserError(
            f"datasets.{index}: the fundus crop of aptos gives images of different sizes: set image_size "
            f"(e.g. datasets.{index}.image_size=224)"
        )
    found = common_size(files, f"datasets.{index} ({root})", index) if size is None else size
    channels = spec.get("channels", inspect.signature(LOADERS[kind]).parameters["channels"].default)
    return None if channels is None else (int(channels), *found)


def csv_options(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The options of an image-CSV dataset spec that say how its table reads."""
    return {k: spec[k] for k in ("path_column", "label_column", "classes") if k in spec}


def images_and_classes(spec: Mapping[str, Any]) -> tuple[int, int] | None:
    """(images, classes) of a generated, image-folder or image-CSV dataset spec, read without decoding an image;
    None for the other kinds."""
    name = str(spec.get("kind") or spec["name"])
    if name in SYNTHETIC:
        generator = SYNTHETIC[name]
        n = spec.get("n", inspect.signature(synthetic).parameters["n"].default)
        return int(n), len(generator.tasks[spec.get("task") or generator.default_task])
    kind, path = loader_kind(name), Path(str(spec.get("path") or spec.get("root") or "")).expanduser()
    if kind == "image_folder" and path.is_dir():
        files = [name for name, file in source_files(path) if file.suffix.lower() != ".csv"]
        return len(files), len({name.split("/")[0] for name in files if "/" in name}) or 1
    if kind == "image_csv" and path.is_file():
        files, _, classes = csv_table(path, **csv_options(spec))
        return len(files), max(1, len(classes))
    return None


def check_components(config: Mapping[str, Any], index: int, spec: Mapping[str, Any]) -> None:
    """Refuse ``hfc.n_components`` above the training images of an average class of dataset ``index`` (its
    images x the training share of the split / its classes): every class's mixture would have more components
    than images."""
    counted = images_and_classes(spec)
    if counted is None:
        return
    images, classes = counted
    split, components = config["split"], config["hfc"]["n_components"]
    per_class = images * (1 - split["val"] - split["test"]) / classes
    if components > per_class:
        raise UserError(
            f"hfc.n_components={components} is more than the about {per_class:.0f} training images per class of "
            f"datasets.{index} ({images} images, {classes} classes, {1 - split['val'] - split['test']:.2f} of them "
            f"for training): lower hfc.n_components (default 2)"
        )


def common_size(files: Sequence[Path], what: str, index: int) -> tuple[int, int]:
    """The one (H, W) of the image ``files`` (headers only). Unreadable files are logged (the loader skips them);
    UserError when none is readable, or when they differ in size (``image_size`` must then be set)."""
    sizes: dict[tuple[int, int], Path] = {}
    unreadable: list[tuple[Path, str]] = []
    for file in files:
        try:
            sizes.setdefault(header_size(file), file)
        except Exception as exc:  # noqa: BLE001 - any decoder failure means "unreadable file"
            unreadable.append((file, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
    if not sizes:
        example = f" (e.g. {unreadable[0][0]}: {unreadable[0][1]})" if unreadable else ""
        raise UserError(f"{what}: none of its {len(files)} image file(s) can be read{example}")
    if unreadable:
        log.warning("%s: %d of %d image files cannot be read and will be skipped, e.g. %s: %s",
                    what, len(unreadable), len(files), *unreadable[0])  # fmt: skip
    if len(sizes) > 1:
        examples = ", ".join(f"{file.name} {h}x{w}" for (h, w), file in list(sizes.items())[:3])
        raise UserError(
            f"{what}: images come in {len(sizes)} sizes ({examples}): set image_size to resize them to one "
            f"(e.g. datasets.{index}.image_size=224)"
        )
    return next(iter(sizes))


def check_model(
    context: RunContext, model_cfg: Mapping[str, Any], label: str, shape: tuple[int, int, int] | None
) -> None:
    """Load the user's model file and run a probe batch of ``shape`` images (when known) through it: UserError
    when it does not load, does not take such images, or returns something other than ``model.output``
    declares; a warning when it seems to return probabilities declared as logits."""
    path = str(model_cfg["checkpoint"])
    if not Path(path).expanduser().is_file():
        raise UserError(f"model.checkpoint {path!r} is not a file")
    spec = user_model_spec(model_cfg, label, shape)
    try:
        model = context.open_user_model(spec)
    except ValueError as exc:  # the loader's own checks (shape, layout, parity): their message says what to fix
        if isinstance(exc, UserError) and path in str(exc):
            raise
        raise UserError(f"model.checkpoint {path!r}: {_first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - a user's file fails to load in as many ways as there are formats
        raise UserError(
            f"model.checkpoint {path!r} cannot be loaded ({type(exc).__name__}: {_first_line(exc)}); expected an "
            "ONNX file, a TorchScript file, an hfc-engine checkpoint or a state_dict"
        ) from None
    if shape is None:
        return
    probe = torch.rand((PROBE_IMAGES, *shape), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            out = model(probe.to(context.device))
    except Exception as exc:  # noqa: BLE001 - whatever the model raises on the data's shape
        raise UserError(
            f"model.checkpoint {path!r} does not take the data's images (C, H, W) = {shape} "
            f"({type(exc).__name__}: {_first_line(exc)}): set the dataset's image_size / channels or model.input"
        ) from None
    check_output(out, model_cfg["output"], getattr(model, "output", "logits"), path)


def check_output(out: torch.Tensor, declared: str, returned: str, path: str) -> None:
    """``out`` (the loaded model's outputs on a probe batch) against ``model.output``: a declared probability
    output the loader kept as such (``returned``: no Softmax node to read before) must give rows whose
    probabilities sum to 1; a model declared to return logits whose rows are probabilities gets a warning."""
    if out.ndim != 2 or not torch.isfinite(out).all():
        raise UserError(
            f"model.checkpoint {path!r} returns {tuple(out.shape)} outputs with non-finite values or not of shape "
            "(N, classes) on a probe batch"
        )
    if declared != "logits" and returned == declared:  # the wrapped model returns log-probabilities
        sums = torch.logsumexp(out.double(), dim=1).exp()
        if (sums - 1).abs().max() > PROBABILITY_TOLERANCE:
            raise UserError(
                f"model.output is {declared!r}, but the probabilities of {path!r} on a probe batch sum to "
                f"{[round(float(s), 3) for s in sums]} per image, not 1: it returns logits (declare model.output: "
                "logits)"
            )
    elif declared == "logits" and out.min() >= 0 and ((out.sum(1) - 1).abs() <= PROBABILITY_TOLERANCE).all():
        log.warning(
            "model.checkpoint %r: its outputs on a probe batch are in [0, 1] and sum to 1 per image, like "
            "probabilities, but model.output is 'logits': declare model.output: probabilities if it ends in a softmax",
            path,
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "no message"
