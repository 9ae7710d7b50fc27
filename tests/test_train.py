"""Training loop (loss decreases, determinism, resume, early stopping, checkpoint), augmentation, metrics."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import numpy as np
import pytest
import sklearn.metrics as skm
import torch
from torch.utils.data import Dataset

from engine import metrics as M
from engine.errors import UserError
from engine.models import (
    Augment,
    TrainConfig,
    build_model,
    evaluate,
    load_checkpoint,
    load_model,
    train,
    train_model,
)

train_mod = importlib.import_module("engine.models.train")  # the package re-exports train()


class ToyDataset(Dataset):
    """In-memory (image in [0,1], label) pairs with the engine.data attributes; class 1 has a bright square."""

    def __init__(self, n: int, seed: int, num_classes: int = 2, channels: int = 3, size: int = 32) -> None:
        gen = torch.Generator().manual_seed(seed)
        labels = torch.arange(n) % num_classes
        images = torch.rand(n, channels, size, size, generator=gen) * 0.5
        for c in range(1, num_classes):
            images[labels == c, :, 4 * c : 4 * c + 8, 8:16] += 0.45
        self.images, self.targets = images, labels.numpy().astype(np.int64)
        self.classes = [f"c{i}" for i in range(num_classes)]
        self.name = "toy"

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.targets[i])


def tiny(num_classes: int = 2, dropout: float = 0.2) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", num_classes, width=0.125, small_stem=True, dropout=dropout, input_size=32)


FAST = {"batch_size": 16, "lr": 3e-3, "max_steps_per_epoch": 3}


def fit(model, data, out_dir, **config):
    """train() with the FAST settings overridden by ``config``, quietly."""
    return train(model, data, TrainConfig(**{**FAST, **config}), out_dir, progress=False)


@pytest.fixture(scope="module")
def data():
    return SimpleNamespace(train=ToyDataset(64, 0), val=ToyDataset(24, 1))


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_loss_goes_down_and_checkpoint_is_complete(tmp_path, data):
    train_ds, val_ds = data.train, data.val
    model = tiny()
    before = evaluate(model, train_ds)["loss"]
    result = fit(model, SimpleNamespace(train=train_ds, val=val_ds, hash="abc"), tmp_path, epochs=4, augment=False)
    after = evaluate(result.model, train_ds)["loss"]
    assert after < 0.7 * before
    assert result.checkpoint == tmp_path / "model.pt" and (tmp_path / "last.pt").is_file()
    assert len(result.history) == result.epochs_run == 4
    assert result.metrics["val"]["loss"] == pytest.approx(result.history[result.best_epoch]["val_loss"], rel=1e-9)
    ckpt = load_checkpoint(result.checkpoint)
    meta = ckpt["meta"]
    assert meta["classes"] == ["c0", "c1"] and meta["dataset"] == "toy" and meta["split_hash"] == "abc"
    assert meta["input_size"] == [3, 32, 32] and meta["best_epoch"] == result.best_epoch
    assert set(meta["metrics"]["val"]) >= {"loss", "accuracy", "auc", "confusion"}
    assert {"torch", "numpy", "engine", "python"} <= set(meta["versions"])
    assert ckpt["config"]["name"] == "resnet18" and "train_state" not in ckpt
    reloaded = load_model(result.checkpoint)
    x = val_ds.images[:5]
    assert torch.equal(reloaded(x), result.model.eval()(x))


def test_same_seed_gives_identical_weights(tmp_path, data):
    runs = [fit(tiny(), data, tmp_path / str(i), epochs=2, seed=3) for i in range(2)]
    w0, w1 = _weights(runs[0].model), _weights(runs[1].model)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    other = fit(tiny(), data, tmp_path / "other", epochs=2, seed=4)
    assert not all(torch.equal(w0[k], v) for k, v in _weights(other.model).items())


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, data, monkeypatch):
    opts = {"epochs": 3, "patience": 10, "schedule": "onecycle", "balanced": True}
    full = fit(tiny(), data, tmp_path / "full", **opts)

    real_epoch = train_mod._run_epoch

    def crash_in_epoch_2(*args, **kwargs):
        if kwargs["epoch"] == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_mod, "_run_epoch", crash_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny(), data, tmp_path / "resumed", **opts)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["train_state"]["epoch"] == 1
    monkeypatch.setattr(train_mod, "_run_epoch", real_epoch)
    fresh = build_model("resnet18", 2, width=0.125, small_stem=True, dropout=0.2, input_size=32)
    resumed = fit(fresh, data, tmp_path / "resumed", **opts)
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in full.history]
    w_full = _weights(full.model)
    assert all(torch.equal(w_full[k], v) for k, v in _weights(resumed.model).items())
    with pytest.raises(ValueError, match="different training configuration"):
        fit(tiny(), data, tmp_path / "resumed", **{**opts, "lr": 1e-2})


def test_early_stopping_restores_best_weights(tmp_path, data, monkeypatch):
    scripted = iter([1.0, 0.5, 0.7, 0.8, 0.9, 1.0])
    snapshots = []
    real_evaluate = train_mod.evaluate

    def fake_val_loss(model, ds, batch_size):
        out = real_evaluate(model, ds, batch_size)
        if len(snapshots) < 6 and ds is data.val and batch_size == 128:
            snapshots.append(_weights(model))
            out["loss"] = next(scripted, out["loss"])
        return out

    monkeypatch.setattr(train_mod, "evaluate", fake_val_loss)
    result = fit(tiny(), data, tmp_path, epochs=6, patience=2)
    assert result.best_epoch == 1 and result.epochs_run == 4 and result.stopped_early
    best = snapshots[1]
    assert all(torch.equal(best[k], v) for k, v in _weights(result.model).items())


def test_undefined_monitor_metric_keeps_first_epoch(tmp_path, data):
    one_class = ToyDataset(8, 2)
    one_class.targets[:] = 0  # validation AUC is undefined (NaN) every epoch
    result = fit(tiny(), SimpleNamespace(train=data.train, val=one_class), tmp_path, epochs=2, monitor="auc")
    assert result.best_epoch == 0 and result.epochs_run == 2 and np.isnan(result.metrics["val"]["auc"])


def test_train_model_from_splits(tmp_path):
    splits = SimpleNamespace(
        train=ToyDataset(48, 0, 3, 1), val=ToyDataset(15, 1, 3, 1), test=ToyDataset(15, 2, 3, 1), hash="h42"
    )
    config = TrainConfig(epochs=1, monitor="kappa", batch_size=16, max_steps_per_epoch=3)
    result = train_model(splits, "resnet18", config, tmp_path, width=0.125, small_stem=True, progress=False)
    meta = load_checkpoint(result.checkpoint)["meta"]
    assert meta["split_hash"] == "h42" and meta["classes"] == ["c0", "c1", "c2"]
    assert set(meta["metrics"]) == {"val", "test"} and "kappa" in meta["metrics"]["test"]
    pixels = splits.train.images
    assert result.model.config["in_channels"] == 1 and result.model.config["input_size"] == 32
    assert result.model.config["mean"][0] == pytest.approx(float(pixels.double().mean()), rel=1e-6)
    assert result.model.config["std"][0] == pytest.approx(float(pixels.double().std(unbiased=False)), rel=1e-5)


def test_train_rejects_bad_input(tmp_path, data):
    with pytest.raises(TypeError, match="ImageClassifier"):
        train(torch.nn.Linear(2, 2), data, TrainConfig(), tmp_path)
    with pytest.raises(TypeError, match=r"data must have \.train and \.val"):
        train(tiny(), data.train, TrainConfig(), tmp_path)
    with pytest.raises(UserError, match="config must be a TrainConfig"):
        train(tiny(), data, {"epochs": 1}, tmp_path)
    with pytest.raises(UserError, match="monitor"):
        train(tiny(), data, TrainConfig(monitor="kappa"), tmp_path)
    with pytest.raises(UserError, match="num_classes"):
        train(tiny(num_classes=3), data, TrainConfig(), tmp_path)
    with pytest.raises(UserError, match="labels"):
        train(tiny(), SimpleNamespace(train=ToyDataset(8, 0, num_classes=4), val=data.val), TrainConfig(), tmp_path)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("epochs", 0), ("epochs", 2.0), ("lr", 0.0), ("lr", "fast"), ("batch_size", 0), ("weight_decay", -1e-3),
        ("balanced", "yes"), ("augment", "flip"), ("patience", 0), ("seed", 1.5), ("schedule", "step"),
        ("monitor", "f1"), ("max_steps_per_epoch", 0), ("snapshots", 1), ("snapshot_every", 0),
    ],
)  # fmt: skip
def test_train_config_names_the_bad_key_and_value(key, value):
    with pytest.raises(UserError, match=rf"^{key} must be .*, got {value!r}$"):
        TrainConfig(**{key: value})


def test_train_config_split_separates_build_options():
    config, build = TrainConfig.split({"arch": "resnet18", "width": 0.25, "epochs": 3, "lr": 2e-3, "seed": 7})
    assert config == TrainConfig(epochs=3, lr=2e-3, seed=7)
    assert build == {"arch": "resnet18", "width": 0.25}


def test_balanced_sampler_equalises_classes():
    targets = np.array([0] * 90 + [1] * 10)
    draws = [list(train_mod._sampler(targets, True, torch.Generator().manual_seed(s))) for s in range(20)]
    assert all(len(d) == 100 for d in draws)
    assert abs(targets[np.concatenate(draws)].mean() - 0.5) < 0.05  # unbalanced sampling would give 0.1
    assert sorted(train_mod._sampler(targets, False, torch.Generator().manual_seed(0))) == list(range(100))


def test_augment_deterministic_bounded_and_switchable():
    x = torch.rand(5, 3, 16, 16)
    a = Augment()(x, torch.Generator().manual_seed(1))
    b = Augment()(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, x)
    off = Augment(hflip=False, max_rotate_deg=0, max_shift=0, brightness=0, contrast=0)
    assert torch.equal(off(x, torch.Generator()), x)
    flipped = Augment(max_rotate_deg=0, max_shift=0, brightness=0, contrast=0)(x, torch.Generator().manual_seed(0))
    for i in range(5):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))
    with pytest.raises(ValueError, match="N,C,H,W"):
        Augment()(x[0], torch.Generator())


# ---- metrics against scikit-learn -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 41, 401])
def test_metrics_match_sklearn(n):
    rng = np.random.default_rng(n)
    t5, p5 = rng.integers(0, 5, n), rng.integers(0, 5, n)
    assert M.accuracy(t5, p5) == pytest.approx(skm.accuracy_score(t5, p5))
    assert np.array_equal(M.confusion_matrix(t5, p5, 5), skm.confusion_matrix(t5, p5, labels=range(5)))
    if n > 1:
        want = skm.cohen_kappa_score(t5, p5, weights="quadratic", labels=range(5))
        assert M.quadratic_weighted_kappa(t5, p5, 5) == pytest.approx(want, abs=1e-12)
        t2 = np.r_[0, 1, rng.integers(0, 2, n - 2)]
        scores = np.round(rng.normal(size=n) + t2, 1)  # rounding creates ties
        auc = M.classification_metrics(t2, np.stack([-scores, scores], 1))["auc"]
        assert auc == pytest.approx(skm.roc_auc_score(t2, scores), abs=1e-12)


def test_classification_metrics_and_degenerate_cases():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    y = np.array([0, 1, 1, 1])
    out = M.classification_metrics(y, probs)
    assert out["accuracy"] == 0.75 and out["confusion"] == [[1, 0], [1, 2]]
    assert out["auc"] == pytest.approx(skm.roc_auc_score(y, probs[:, 1]))
    three = M.classification_metrics(np.array([0, 1, 2]), np.eye(3))
    assert three["kappa"] == pytest.approx(1.0) and "auc" not in three
    assert np.isnan(M.classification_metrics(np.array([1, 1]), probs[:2])["auc"])  # one class: AUC undefined
    assert np.isnan(M.quadratic_weighted_kappa([2, 2], [2, 2]))
    with pytest.raises(ValueError, match="same length"):
        M.accuracy([0, 1], [0])
    with pytest.raises(TypeError, match="integer"):
        M.accuracy([0.5, 1], [0, 1])
    with pytest.raises(ValueError, match="out of range"):
        M.confusion_matrix([0, 3], [0, 1], num_classes=2)
    with pytest.raises(ValueError, match="NaN"):
        M.auroc([0.1], [np.nan])
    with pytest.raises(ValueError, match="probs"):
        M.classification_metrics([0, 1], np.ones((2, 1)))
