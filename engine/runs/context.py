"""What one process shares across the cells it runs: datasets, splits, test pools, models, memoised features.

Nothing here is persisted: a resumed run (or another worker) re-creates these objects from the cells' inputs and
the artifacts. Trained models are cached on disk by what determines them, (model settings, split, seed), so the
audit and the studies never train the same model twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from threadpoolctl import threadpool_limits
from torch import nn

from engine.attacks import noise_like
from engine.data import ImageDataset, Splits, as_tensors, content_fingerprint, load_dataset, split_dataset
from engine.detectors import FeatureCache, Features
from engine.errors import UserError
from engine.fileio import atomic_write, file_sha256
from engine.models import TrainConfig, label_with_model, load_model, resolve_layers, train_model
from engine.runs.artifacts import Artifacts
from engine.runs.schema import dataset_label, fingerprint

log = logging.getLogger("engine.runs")
MEMORY = "memory:"  # prefix of the references of models handed over in memory (engine.audit)
SPEC_ONLY_KEYS = ("label", "labels", "content")  # dataset-spec keys that are not loader options (row names, label
# source, the content fingerprint content_keyed adds)
MODEL_SPEC = "model.json"  # a user's model file and its declared conventions (RunContext.user_model)


class RunContext:
    """Live objects of one process; ``artifacts`` is where cells read and write files."""

    def __init__(self, artifacts: Artifacts, device: str = "cpu", progress: bool = True) -> None:
        self.artifacts = artifacts
        self.device = device
        self.progress = progress
        self._datasets: dict[str, ImageDataset] = {}
        self._registered: set[str] = set()  # keys of in-memory datasets handed over (never released)
        self._models: dict[str, nn.Module] = {}
        self._memo: dict[Any, Any] = {}

    # -- data -------------------------------------------------------------------------------------------------
    def register_dataset(self, spec: Mapping[str, Any], dataset: ImageDataset) -> None:
        """Serve ``dataset`` for ``spec`` (an in-memory dataset handed to engine.audit)."""
        self._datasets[fingerprint(dict(spec))] = dataset
        self._registered.add(fingerprint(dict(spec)))

    def dataset(self, spec: Mapping[str, Any]) -> ImageDataset:
        key = fingerprint(dict(spec))
        if key not in self._datasets:
            dataset = load_dataset({k: v for k, v in spec.items() if k not in SPEC_ONLY_KEYS})
            if not dataset.labelled:
                labels = spec.get("labels")
                if not isinstance(labels, Mapping):
                    raise UserError(
                        f"{dataset_label(spec)}: the data has no labels (a folder without class folders, or a CSV "
                        "without a label column); add 'labels: model' to its spec to use model.checkpoint's predictions"
                    )
                labeller = self.model(self.user_model(labels, "labeller", tuple(dataset[0][0].shape)))
                dataset = label_with_model(labeller, dataset)
            self._datasets[key] = dataset
        return self._datasets[key]

    def splits(self, spec: Mapping[str, Any], split: Mapping[str, float], seed: int) -> Splits:
        """The seeded, stratified train/val/test split of ``spec`` (fractions from the ``split`` settings)."""
        return self.memo(
            ("splits", fingerprint([spec, split, seed])),
            lambda: split_dataset(self.dataset(spec), val=split["val"], test=split["test"], seed=seed),
        )

    def pool(self, spec: Mapping[str, Any], split: Mapping[str, float], seed: int, size: int | None) -> Any:
        """The first ``size`` test images (all when None) as (x, y) tensors; warns when the test split holds fewer."""

        def build() -> Any:
            test = self.splits(spec, split, seed).test
            if size is not None and len(test) < size:
                log.warning(
                    "%s: the attack pool asks for %d test images but the test split holds %d (split.test=%s of "
                    "%d images); using %d. Raise split.test or use more data to get more.",
                    dataset_label(spec), size, len(test), split["test"], len(self.dataset(spec)), len(test),
                )  # fmt: skip
            return as_tensors(test, limit=size, name=f"the test split of {dataset_label(spec)}")

        return self.memo(("pool", fingerprint([spec, split, seed, size])), build)

    # -- models -----------------------------------------------------------------------------------------------
    def register_model(self, model: nn.Module, key: str) -> str:
        """Serve an in-memory ``model`` (engine.audit); returns its reference for payloads."""
        ref = MEMORY + key
        self._models[ref] = model.to(self.device).eval()
        return ref

    def model(self, ref: str) -> nn.Module:
        """The model a payload names: an in-memory reference, a model spec written by :meth:`user_model`, or an
        artifact-relative or absolute checkpoint path."""
        if ref not in self._models:
            if ref.startswith(MEMORY):
                raise UserError(f"model {ref!r} was handed over in memory to another process; rerun engine.audit()")
            path = self.artifacts.path(ref)
            if path.name == MODEL_SPEC:
                model = self.open_user_model(json.loads(path.read_text()))
            else:
                model = load_model(path).to(self.device).eval()
            self._models[ref] = model
        return self._models[ref]

    def open_user_model(self, spec: Mapping[str, Any]) -> nn.Module:
        """The user's model a :func:`user_model_spec` describes, loaded once per process (the pre-flight check and
        the model cell share it)."""
        return self.memo(
            ("user model", fingerprint(dict(spec))),
            lambda: load_model(spec["path"], **{k: v for k, v in spec.items() if k != "path"}).to(self.device).eval(),
        )

    def user_model(self, settings: Mapping[str, Any], name: str, shape: Sequence[int]) -> str:
        """Reference to a model spec (``models/<name>-<key>/model.json``, :func:`user_model_spec`) of the user's
        ``model.checkpoint``."""
        spec = user_model_spec(settings, name, shape)
        directory = self.artifacts.directory("models", name, fingerprint(spec))
        atomic_write(directory / MODEL_SPEC, lambda p: p.write_text(json.dumps(spec, indent=1)))
        return self.artifacts.ref(directory / MODEL_SPEC)

    def trained(self, splits: Splits, settings: Mapping[str, Any], seed: int) -> str:
        """Reference to the checkpoint of ``settings`` (arch, build options, epochs, lr, batch_size...) trained on
        ``splits`` with ``seed``: trained once, then found again in ``models/`` by (settings, split, seed).

        Training writes ``last.pt`` after every epoch (an interrupted run resumes from it) and ``model.pt`` at
        the end, both atomically.
        """
        settings = dict(settings)
        key = fingerprint({"model": settings, "split": splits.hash, "seed": seed})
        directory = self.artifacts.directory("models", f"{settings['arch']}-{splits.dataset.name}", key)
        final = directory / "model.pt"
        if not final.is_file():
            config, build = TrainConfig.split({**settings, "seed": seed})
            train_model(
                splits, build.pop("arch"), config, directory, progress=self.progress, device=self.device, **build
            )
        return self.artifacts.ref(final)

    # -- features ---------------------------------------------------------------------------------------------
    def features(
        self, checkpoint: str, key: Sequence[Any], images: torch.Tensor, labels: torch.Tensor, layers: Sequence[str],
        keep_images: bool = True, raw_layers: Sequence[str] = (),
    ) -> Features:  # fmt: skip
        """Logits and pooled features of ``layers`` (resolved names) for the image set ``key`` (``images``,
        ``labels``) under the model ``checkpoint``, with the images when ``keep_images``. One pass per batch
        extracts every activation plus ``layers`` and is memoised by ``key``, so the stages and layer arms that read
        one image set share it: HFC's mixtures and the detectors read the training images, both detector arms and
        the features stage the pool's sets. With ``raw_layers`` the pass also keeps those layers' (capped) raw maps
        and pooled features for this caller only (raw maps are large: engine.models.cap_raw_map), and memoises its
        pooled part as above, so a raw-map reader that comes first saves the readers after it their pass."""
        model = self.model(checkpoint)
        wide = tuple(resolve_layers(model, [*resolve_layers(model, "activations"), *layers, *raw_layers]))
        memo_key = ("features", checkpoint, wide, keep_images, *key)
        cache = self.feature_cache(checkpoint, wide, raw_layers)
        if raw_layers:
            feats = cache.extract(images, labels.numpy(), keep_images=keep_images)
            self._memo.setdefault(memo_key, replace(feats, raw={}))
            return feats.select(list(dict.fromkeys([*layers, *raw_layers])))
        extract = lambda: cache.extract(images, labels.numpy(), keep_images=keep_images)  # noqa: E731
        return self.memo(memo_key, extract).select(layers)

    def feature_cache(self, checkpoint: str, layers: Sequence[str], raw_layers: Sequence[str] = ()) -> FeatureCache:
        """The FeatureCache of ``layers`` (and ``raw_layers``' raw maps) on the model ``checkpoint``, one per process:
        its hooks and its batch-size probe are made once."""
        model = self.model(checkpoint)
        build = lambda: FeatureCache(model, layers=layers, raw_layers=raw_layers, device=self.device)  # noqa: E731
        return self.memo(("cache", checkpoint, tuple(layers), tuple(raw_layers)), build)

    # -- memo -------------------------------------------------------------------------------------------------
    def memo(self, key: Any, build: Callable[[], Any]) -> Any:
        """``build()`` once per key in this process (features, pools, splits)."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def clear(self) -> None:
        """Drop memoised features and pools (keeps datasets and models)."""
        self._memo.clear()

    def release(self) -> None:
        """Drop everything held for the cells run so far (memo, datasets, models): they are rebuilt on demand.
        In-memory datasets and models handed to engine.audit stay."""
        self._memo.clear()
        self._datasets = {k: v for k, v in self._datasets.items() if k in self._registered}
        self._models = {k: v for k, v in self._models.items() if str(k).startswith(MEMORY)}


@contextmanager
def threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` threads in torch and in every BLAS and OpenMP pool loaded, then restore them.

    engine.ops' C++ kernels take ``omp_get_max_threads()`` of the OpenMP runtime they share with torch (both load
    ``libgomp.so.1``, torch's copy first), so ``torch.set_num_threads`` sets theirs too; threadpoolctl covers the
    BLAS behind numpy, scipy and scikit-learn (the HFC mixtures' EM, the detectors).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        with threadpool_limits(limits=count):
            yield
    finally:
        torch.set_num_threads(previous)


def checkpoint_ref(path: str | Path) -> str:
    """An absolute reference to a user's checkpoint file (so it resolves from any working directory)."""
    return str(Path(path).expanduser().resolve())


def checkpoint_identity(path: str | Path) -> dict[str, str]:
    """What a cell's inputs say about a user's checkpoint: its absolute path and the sha256 of its bytes, so a
    model file replaced at the same path reruns every cell that depends on it."""
    ref = checkpoint_ref(path)
    if not Path(ref).is_file():
        raise UserError(f"model.checkpoint {str(path)!r} is not a file")
    return {"checkpoint": ref, "checkpoint_sha256": file_sha256(ref)}


def content_keyed(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` with its data's content fingerprint under ``content`` (engine.data.content_fingerprint) when it
    reads files, so every cell of the dataset is keyed by what the files hold; synthetic and in-memory specs are
    returned as they are (their spec determines the data)."""
    content = content_fingerprint(spec)
    return dict(spec) if content is None else {**spec, "content": content}


def user_model_spec(settings: Mapping[str, Any], name: str, shape: Sequence[int] | None) -> dict[str, Any]:
    """How to load the user's ``model.checkpoint`` (model settings) with its declared conventions (``model.input``,
    ``output``, ``parity_tolerance``); an undeclared input size is the data's (C, H, W) ``shape``, which
    TorchScript conversion needs."""
    convention = dict(settings["input"])
    convention["size"] = convention.get("size") or (None if shape is None else list(shape))
    return {
        "path": checkpoint_ref(settings["checkpoint"]),
        "input": convention,
        "output": settings["output"],
        "parity_tolerance": settings["parity_tolerance"],
        "name": name,
    }


# keys of the image sets RunContext.features memoises, from a cell's inputs (dataset, split, seed, pool, noise
# settings); the adversarial sets' keys are ("adversarial", the attack cell's artifact reference)
def pool_key(inputs: Any) -> str:
    """The key of a cell's attack pool (its dataset, split, seed and pool size)."""
    return fingerprint([inputs.dataset, inputs.split, inputs.seed, inputs.pool])


def train_key(inputs: Any, images: int) -> tuple[str, str, int]:
    """The feature key of the first ``images`` training images (all of them, or a sample of that many)."""
    return "train", fingerprint([inputs.dataset, inputs.split, inputs.seed]), images


def noise_key(inputs: Any) -> tuple[str, str, str, str]:
    """The feature key of the pool's noise control (:func:`noise_images`)."""
    return "noise", pool_key(inputs), str(inputs.noise_eps), inputs.noise


def noise_images(inputs: Any, x: torch.Tensor) -> torch.Tensor:
    """The noise control of the pool ``x``: random noise of the kind ``detector.noise`` at ``noise_eps``."""
    return noise_like(x, inputs.noise_eps, kind=inputs.noise, seed=inputs.seed)
