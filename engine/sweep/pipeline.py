"""The audit pipeline as cells: model -> HFC mixtures -> adversarial sets -> detectors -> feature projections.

Per dataset: one ``model`` cell (train or load, clean metrics), one ``gmms`` cell (per-(layer, class) mixtures for
HFC), one ``attack`` cell per (attack, eps, hfc) writing an adversarial set, one ``detect`` cell per (attack, eps,
detector) fitting the detector on plain AEs and scoring plain and HFC AEs (the paper's protocol), and one
``projection`` cell with the features the report plots. Cells are pure functions of their JSON inputs and their
dependencies' payloads; live objects (datasets, models, extracted features) are memoised in a :class:`Workspace`.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.sweep.executor import Cell, CellOutput

HEADLINE_SUBSET = "successful"


@dataclass
class Workspace:
    """Live objects shared by the cells of one process (never persisted: cells re-create them on resume)."""

    device: str = "cpu"
    progress: bool = True
    datasets: dict[str, Any] = field(default_factory=dict)
    models: dict[str, nn.Module] = field(default_factory=dict)
    features: dict[tuple[str, ...], Any] = field(default_factory=dict)

    def dataset(self, spec: Mapping[str, Any]) -> Any:
        key = _fingerprint(spec)
        if key not in self.datasets:
            from engine.data import load_dataset

            self.datasets[key] = load_dataset(dict(spec))
        return self.datasets[key]

    def splits(self, spec: Mapping[str, Any], seed: int) -> Any:
        from engine.data import split_dataset

        return split_dataset(self.dataset(spec), val=0.15, test=0.15, seed=seed)

    def model(self, path: str | Path) -> nn.Module:
        key = str(path)
        if key not in self.models:
            from engine.models import load_model

            self.models[key] = load_model(key).to(self.device).eval()
        return self.models[key]


def _fingerprint(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def slug(spec: Mapping[str, Any]) -> str:
    """A short readable dataset label, e.g. 'fundus-synth:binary'."""
    name = str(spec.get("name"))
    return f"{name}:{spec['task']}" if spec.get("task") else name


# ---------------------------------------------------------------------------------------------------------------
# Stage functions: (workspace, inputs, deps, workdir) -> CellOutput


def stage_model(ws: Workspace, inputs: Mapping[str, Any], deps: Mapping[str, Any], workdir: Path) -> CellOutput:
    """Train the model on the dataset's train split (or load a checkpoint) and report clean test metrics."""
    from engine.models import evaluate, train_model

    spec, cfg = inputs["dataset"], inputs["model"]
    splits = ws.splits(spec, inputs["seed"])
    split_file = workdir / "splits" / f"{_fingerprint([spec, inputs['seed']])}.json"
    splits.save(split_file)
    if cfg.get("checkpoint") in ws.models:  # a live model handed to engine.audit()
        checkpoint = cfg["checkpoint"]
    elif cfg.get("checkpoint"):
        checkpoint = str(Path(cfg["checkpoint"]).expanduser().resolve())
    else:
        out_dir = workdir / "models" / _fingerprint(inputs)
        result = train_model(
            splits,
            cfg["arch"],
            out_dir=out_dir,
            width=cfg["width"],
            dropout=cfg["dropout"],
            epochs=cfg["epochs"],
            lr=cfg["lr"],
            batch_size=cfg["batch_size"],
            seed=inputs["seed"],
            progress=ws.progress,
            device=ws.device,
        )
        checkpoint = str(result.checkpoint)
    metrics = evaluate(ws.model(checkpoint), splits.test)
    base = {"dataset": slug(spec), "model": cfg["arch"]}
    rows = [{**base, "metric": f"clean_{k}", "value": v} for k, v in metrics.items() if _is_number(v)]
    payload = {
        "checkpoint": str(checkpoint),
        "split_file": str(split_file),
        "split_hash": splits.hash,
        "classes": list(splits.train.classes),
        "metrics": {k: v for k, v in metrics.items() if _is_number(v)},
    }
    return CellOutput(payload, rows)


def stage_gmms(ws: Workspace, inputs: Mapping[str, Any], deps: Mapping[str, Any], workdir: Path) -> CellOutput:
    """Fit the per-(layer, class) mixtures of HFC on training features."""
    from engine.attacks import fit_hfc_gmms, save_hfc_gmms

    model_info = deps[inputs["model_cell"]]
    model = ws.model(model_info["checkpoint"])
    splits = ws.splits(inputs["dataset"], inputs["seed"])
    hfc = inputs["hfc"]
    gmms = fit_hfc_gmms(
        model, splits.train, hfc["layers"], n_components=hfc["n_components"], seed=inputs["seed"], reg_covar=1e-4
    )
    directory = save_hfc_gmms(gmms, workdir / "gmms" / _fingerprint(inputs))
    return CellOutput({"directory": str(directory), "layers": list(gmms)})


def stage_attack(ws: Workspace, inputs: Mapping[str, Any], deps: Mapping[str, Any], workdir: Path) -> CellOutput:
    """Attack the test split (targeted to another class) and store the adversarial set incrementally."""
    from engine.attacks import ATTACKS, HFC, AdvWriter, load_hfc_gmms

    model_info = deps[inputs["model_cell"]]
    model = ws.model(model_info["checkpoint"])
    x, y = _test_pool(ws, inputs)
    constraint = None
    if inputs["hfc"]:
        hfc = inputs["hfc_config"]
        gmms = load_hfc_gmms(deps[inputs["gmms_cell"]]["directory"])
        constraint = HFC(gmms, lam=hfc["lam"], mode=hfc["mode"])
    options = {"eps": inputs["eps"], "targeted": "random" if inputs["targeted"] else False, "seed": inputs["seed"]}
    if inputs["attack"] != "fgsm":
        options["steps"] = inputs["steps"]
    attack = ATTACKS[inputs["attack"]](model, constraint=constraint, **options)
    directory = workdir / "adversarial" / _fingerprint(inputs)
    writer = AdvWriter(directory, classes=model_info["classes"], name=inputs["label"])
    done = set(writer.stored_indices().tolist())
    batch = inputs["batch_size"]
    for start in range(0, len(x), batch):
        index = np.arange(start, min(start + batch, len(x)))
        if set(index.tolist()) <= done:
            continue
        result = attack(x[index], y[index])
        writer.append(result.adv, y[index], index=index, target=result.target, success=result.success)
    adv = _load_adv(directory)
    success = np.asarray(adv.meta["success"], dtype=bool)
    clean_pred = _predict(model, x, inputs["batch_size"])
    correct = clean_pred == y.numpy()
    base = {
        "dataset": inputs["dataset_label"],
        "model": inputs["arch"],
        "attack": inputs["attack"],
        "eps": inputs["eps"],
        "hfc": inputs["hfc"],
        "detector": "",
    }
    rows = [
        {
            **base,
            "metric": "attack_success_rate",
            "value": float(success[correct].mean()) if correct.any() else float("nan"),
        }
    ]
    return CellOutput({"directory": str(directory), "n": len(x)}, rows)


def stage_detect(ws: Workspace, inputs: Mapping[str, Any], deps: Mapping[str, Any], workdir: Path) -> CellOutput:
    """Fit one detector on plain AEs (70% of the pool) and score plain and HFC AEs on the other 30%."""
    from engine.attacks import noise_like
    from engine.detectors import run_protocol

    model_info = deps[inputs["model_cell"]]
    cache = _feature_cache(ws, model_info["checkpoint"])
    x, y = _test_pool(ws, inputs)
    clean = _features(ws, cache, ("clean", model_info["checkpoint"], _fingerprint(inputs["pool_key"])), x, y)
    noise_x = noise_like(x, inputs["eps"], kind="uniform", seed=inputs["seed"])
    noise = _features(
        ws, cache, ("noise", model_info["checkpoint"], _fingerprint(inputs["pool_key"]), str(inputs["eps"])), noise_x, y
    )
    plain_dir, hfc_dir = deps[inputs["plain_cell"]]["directory"], deps[inputs["hfc_cell"]]["directory"]
    plain, plain_success = _adv_features(ws, cache, plain_dir, y)
    transfer = None
    if inputs["hfc_cell"] != inputs["plain_cell"]:
        hfc_feats, hfc_success = _adv_features(ws, cache, hfc_dir, y)
        transfer = {"hfc": (hfc_feats, hfc_success)}
    train = None
    if inputs["detector"] in ("kd", "maha", "dnr"):
        splits = ws.splits(inputs["dataset"], inputs["seed"])
        train_x, train_y = _stack(splits.train, limit=inputs["train_limit"], seed=inputs["seed"])
        train = _features(ws, cache, ("train", model_info["checkpoint"]), train_x, train_y)
    detector = _make_detector(inputs["detector"], inputs["seed"], cache.extractor.layers, inputs.get("options", {}))
    result = run_protocol(
        [detector],
        clean,
        plain,
        plain_success,
        noise=noise,
        labels=y.numpy(),
        source=cache,
        transfer=transfer,
        train=train,
        attack_name="plain",
        fit_fraction=inputs["fit_fraction"],
        seed=inputs["seed"],
        n_boot=inputs["bootstrap"],
    )
    out_dir = workdir / "detectors" / _fingerprint(inputs)
    detector.save(out_dir / "fitted")
    score_file = out_dir / "scores.npz"
    arrays = {f"{k.replace('/', '__')}": v for k, v in result.scores[detector.name].items()}
    arrays.update({f"index__{k.replace('/', '__')}": v for k, v in result.index.items()})
    _save_npz(score_file, arrays)
    base = {
        "dataset": inputs["dataset_label"],
        "model": inputs["arch"],
        "attack": inputs["attack"],
        "eps": inputs["eps"],
        "detector": inputs["detector"],
    }
    rows = []
    for r in result.to_rows():
        metric = r["metric"] if r["subset"] == HEADLINE_SUBSET else f"{r['metric']}@{r['subset']}"
        rows.append(
            {
                **base,
                "hfc": r["attack"] == "hfc",
                "metric": metric,
                "value": r["value"],
                "ci_low": r["ci_low"],
                "ci_high": r["ci_high"],
            }
        )
    return CellOutput({"scores": str(score_file), "fitted": str(out_dir / "fitted")}, rows)


def stage_projection(ws: Workspace, inputs: Mapping[str, Any], deps: Mapping[str, Any], workdir: Path) -> CellOutput:
    """GAP features of clean, plain-AE and HFC-AE images at a shallow and a deep layer, for the report's PCA plot."""
    from engine.attacks import extract_features
    from engine.models import resolve_layers

    model = ws.model(deps[inputs["model_cell"]]["checkpoint"])
    layers = resolve_layers(model, "*relu*")
    chosen = [layers[min(1, len(layers) - 1)], layers[-1]]
    x, y = _test_pool(ws, inputs)
    arrays = {}
    for group, source in (("clean", None), ("plain AE", inputs["plain_cell"]), ("HFC AE", inputs["hfc_cell"])):
        images = x if source is None else _load_adv(deps[source]["directory"]).images
        feats, _, _ = extract_features(model, (images, y), chosen)
        for layer in chosen:
            arrays[f"{group}|{layer}"] = feats[layer].numpy()
    path = workdir / "projections" / f"{_fingerprint(inputs)}.npz"
    _save_npz(path, arrays)
    return CellOutput(
        {
            "file": str(path),
            "layers": chosen,
            "dataset": inputs["dataset_label"],
            "attack": inputs["attack"],
            "eps": inputs["eps"],
        }
    )


def stage_study(ws: Workspace, inputs: Mapping[str, Any], deps: Mapping[str, Any], workdir: Path) -> CellOutput:
    """One of the papers' studies (engine.studies): its rows, and its payload for the report."""
    from engine.studies import STUDIES

    run, _ = STUDIES[inputs["study"]]
    result = run(inputs["config"], workdir / "studies" / inputs["study"], progress=ws.progress)
    return CellOutput({"study": inputs["study"], "payload": result.payload}, result.rows)


# ---------------------------------------------------------------------------------------------------------------
# Building the cell list from a config


def build_cells(config: Mapping[str, Any], ws: Workspace) -> list[Cell]:
    """Every cell of the audit described by ``config`` (see engine.sweep.config.DEFAULTS)."""
    cells: list[Cell] = []
    seed, attack_cfg, hfc_cfg = config["seed"], config["attack"], config["hfc"]
    for study in config["studies"]:
        study_cfg = {"seed": seed, **config["study"].get(study, {})}
        cells.append(
            Cell(
                "study",
                functools.partial(stage_study, ws),
                {"study": study, "config": study_cfg},
                label=f"{study} study",
            )
        )
    for spec in config["datasets"]:
        label = slug(spec)
        model_cell = Cell(
            "model",
            functools.partial(stage_model, ws),
            {"dataset": spec, "model": config["model"], "seed": seed},
            label=f"{label} model",
        )
        cells.append(model_cell)
        gmm_cell = None
        if hfc_cfg["enabled"]:
            gmm_cell = Cell(
                "gmms",
                functools.partial(stage_gmms, ws),
                {"dataset": spec, "hfc": _gmm_settings(hfc_cfg), "seed": seed, "model_cell": model_cell.key},
                deps=(model_cell.key,),
                label=f"{label} HFC mixtures",
            )
            cells.append(gmm_cell)
        pool_key = {"dataset": spec, "seed": seed, "pool": attack_cfg["pool"]}
        common = {
            "dataset": spec,
            "dataset_label": label,
            "arch": config["model"]["arch"],
            "seed": seed,
            "pool": attack_cfg["pool"],
            "model_cell": model_cell.key,
        }
        for attack in config["attacks"]:
            for eps in config["eps"]:
                sets = {}
                for use_hfc in (False, True) if gmm_cell is not None else (False,):
                    inputs = {
                        **common,
                        "attack": attack,
                        "eps": eps,
                        "hfc": use_hfc,
                        "steps": attack_cfg["steps"],
                        "targeted": attack_cfg["targeted"],
                        "batch_size": attack_cfg["batch_size"],
                        "label": f"{label} {attack} eps={eps}{' +HFC' if use_hfc else ''}",
                    }
                    deps: tuple[str, ...] = (model_cell.key,)
                    if use_hfc:
                        inputs.update(hfc_config=hfc_cfg, gmms_cell=gmm_cell.key)
                        deps += (gmm_cell.key,)
                    sets[use_hfc] = Cell(
                        "attack", functools.partial(stage_attack, ws), inputs, deps, label=inputs["label"]
                    )
                    cells.append(sets[use_hfc])
                plain, hfc = sets[False], sets.get(True, sets[False])
                for detector in config["detectors"]:
                    inputs = {
                        **common,
                        "attack": attack,
                        "eps": eps,
                        "detector": detector,
                        "pool_key": pool_key,
                        "plain_cell": plain.key,
                        "hfc_cell": hfc.key,
                        "fit_fraction": config["detector"]["fit_fraction"],
                        "bootstrap": config["detector"]["bootstrap"],
                        "train_limit": 1000,
                    }
                    if isinstance(config["detector"].get(detector), Mapping):
                        inputs["options"] = dict(config["detector"][detector])
                    cells.append(
                        Cell(
                            "detect",
                            functools.partial(stage_detect, ws),
                            inputs,
                            tuple(dict.fromkeys((model_cell.key, plain.key, hfc.key))),
                            label=f"{label} {attack} eps={eps} {detector}",
                        )
                    )
        if gmm_cell is not None and config["attacks"]:
            attack, eps = config["attacks"][-1], config["eps"][-1]  # the strongest setting: the last of each
            plain, hfc = sets[False], sets[True]
            inputs = {**common, "attack": attack, "eps": eps, "plain_cell": plain.key, "hfc_cell": hfc.key}
            cells.append(
                Cell(
                    "projection",
                    functools.partial(stage_projection, ws),
                    inputs,
                    (model_cell.key, plain.key, hfc.key),
                    label=f"{label} projection",
                )
            )
    return cells


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def _gmm_settings(hfc_cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {"layers": hfc_cfg["layers"], "n_components": hfc_cfg["n_components"]}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _stack(dataset: Any, limit: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(dataset)
    index = np.arange(n)
    if limit is not None and n > limit:
        index = np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))
    items = [dataset[int(i)] for i in index]
    return torch.stack([im for im, _ in items]), torch.tensor([int(lb) for _, lb in items])


def _test_pool(ws: Workspace, inputs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``pool`` images of the test split (deterministic; memoised)."""
    key = ("pool", _fingerprint([inputs["dataset"], inputs["seed"], inputs["pool"]]))
    if key not in ws.features:
        test = ws.splits(inputs["dataset"], inputs["seed"]).test
        n = min(inputs["pool"], len(test))
        items = [test[i] for i in range(n)]
        ws.features[key] = (torch.stack([im for im, _ in items]), torch.tensor([int(lb) for _, lb in items]))
    return ws.features[key]


def _predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]).numpy()


def _load_adv(directory: str | Path) -> Any:
    from engine.attacks import load_adversarial

    return load_adversarial(directory)


def _feature_cache(ws: Workspace, checkpoint: str) -> Any:
    from engine.detectors import FeatureCache
    from engine.models import resolve_layers

    key = ("cache", checkpoint)
    if key not in ws.features:
        model = ws.model(checkpoint)
        layers = resolve_layers(model, "*relu*")
        ws.features[key] = FeatureCache(model, layers=layers, raw_layers=layers[-3:], device=ws.device)
    return ws.features[key]


def _features(ws: Workspace, cache: Any, key: tuple[str, ...], x: torch.Tensor, y: torch.Tensor) -> Any:
    if key not in ws.features:
        ws.features[key] = cache.extract(x, y.numpy())
    return ws.features[key]


def _adv_features(ws: Workspace, cache: Any, directory: str, y: torch.Tensor) -> tuple[Any, np.ndarray]:
    adv = _load_adv(directory)
    order = np.argsort(np.asarray(adv.meta["index"]))
    images = adv.images[order]
    feats = _features(ws, cache, ("adv", directory), images, y)
    return feats, np.asarray(adv.meta["success"], dtype=bool)[order]


def _make_detector(name: str, seed: int, layers: Sequence[str], options: Mapping[str, Any]) -> Any:
    """A detector with the run's settings (``options``: its keyword arguments from ``detector.<name>``): MAHA (one
    backward per layer for its input preprocessing) on the output of each stage, as in Lee et al.; every other
    detector on its own default layers."""
    from engine.detectors import DETECTORS

    if name == "maha":
        options = {"layers": stage_outputs(layers), **options}
    return DETECTORS[name](seed=seed, **options)


def stage_outputs(layers: Sequence[str]) -> list[str]:
    """The last hooked layer of each stage (layer names grouped by their first dotted component)."""
    last: dict[str, str] = {}
    for name in layers:
        last[name.split(".")[0]] = name
    return list(last.values())


def _save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    from engine.fileio import atomic_write

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)

    atomic_write(path, write)


def detectors_for(names: Sequence[str]) -> list[str]:
    """Validate detector names against the registry."""
    from engine.detectors import DETECTORS

    unknown = [n for n in names if n not in DETECTORS]
    if unknown:
        raise ValueError(f"unknown detectors {unknown}; available: {sorted(DETECTORS)}")
    return list(names)
