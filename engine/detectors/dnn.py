"""DNN detector (Metzen et al., ICLR 2017): a small binary CNN on a layer's raw feature map, one per layer.

Architecture: conv3x3(96) - ReLU - maxpool2 - conv3x3(192) - ReLU - maxpool2 - conv3x3(192) - ReLU - conv1x1(1) -
global average pool -> logit (sigmoid = P(adversarial)); widths scale with ``width`` for small CPU runs; a pool is
skipped when the map is already 1 pixel wide. Inputs are standardised per channel with fit-split statistics.
Trained with class-balanced BCE and Adam, seeded, until the loss on a held-out fifth of the fit data stops improving
(``patience`` epochs; at most ``epochs``), keeping the best epoch. Score = mean over layers of the per-layer logits
(the logit is monotone in the sigmoid output and does not saturate into ties).
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from engine.detectors.base import Cost, Detector, Needs, Requirements
from engine.detectors.features import Features
from engine.errors import UserError


def detector_net(channels: int, size: int, width: float = 1.0) -> nn.Sequential:
    """Metzen's detector subnetwork for (channels, size, size) inputs."""
    w1, w2 = max(1, round(96 * width)), max(1, round(192 * width))
    pool1 = nn.MaxPool2d(2) if size >= 2 else nn.Identity()
    pool2 = nn.MaxPool2d(2) if size >= 4 else nn.Identity()
    return nn.Sequential(
        nn.Conv2d(channels, w1, 3, padding=1),
        nn.ReLU(),
        pool1,
        nn.Conv2d(w1, w2, 3, padding=1),
        nn.ReLU(),
        pool2,
        nn.Conv2d(w2, w2, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(w2, 1, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(0),
    )


class DNN(Detector):
    """Per-layer CNN detectors on raw feature maps (default: every layer whose raw map was extracted)."""

    name = "dnn"
    requires = Requirements(raw_maps=True)
    cost = Cost(seconds_per_image=7.5e-3)
    combine = "mean"

    def __init__(
        self,
        layers: list[str] | str | None = None,
        width: float = 1.0,
        epochs: int = 50,
        patience: int = 3,
        lr: float = 1e-3,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__(layers, False, seed)
        if width <= 0 or epochs < 1 or patience < 0 or lr <= 0 or batch_size < 1:
            raise UserError(
                f"need width > 0, epochs >= 1, patience >= 0, lr > 0, batch_size >= 1; got {width}, {epochs}, "
                f"{patience}, {lr}, {batch_size}"
            )
        self.width, self.epochs, self.lr, self.batch_size = float(width), int(epochs), float(lr), int(batch_size)
        self.patience = int(patience)
        self.epochs_: list[int] = []  # epochs each layer's net trained for
        self.nets_: list[nn.Sequential] = []
        self.norm_: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.sizes_: list[int] = []
        self.session_ = None  # onnxruntime session of the standardisation + nets (use_onnxruntime)

    def needs(self) -> Needs:
        self._check_fitted()
        return Needs(raw=tuple(self.layers_))

    def reads(self, layers: Sequence[str], raw_layers: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Only raw maps: those of its ``layers``, else every one extracted."""
        return (), tuple(raw_layers if self.layers is None else self.layers)

    def _resolve_layers(self, feats: Features) -> list[str]:
        layers = list(feats.raw) if self.layers is None else self.layers
        if not layers:
            raise UserError("DNN needs raw feature maps: extract them with FeatureCache(raw_layers=[...])")
        for name in layers:
            feats.raw_map(name)
        return layers

    def _maps(self, x: Features, j: int) -> torch.Tensor:
        self._check_maps(x, [j])
        mean, std = self.norm_[j]
        return (x.raw_map(self.layers_[j]).float() - mean) / std

    def _check_maps(self, x: Features, layers: list[int] | None = None) -> None:
        for j in range(len(self.layers_)) if layers is None else layers:
            name = self.layers_[j]
            maps = x.raw_map(name)
            if maps.dim() != 4 or maps.shape[1] != self.dims_[name] or maps.shape[-1] != self.sizes_[j]:
                raise UserError(
                    f"raw map of layer {name!r} has shape {tuple(maps.shape[1:])}; the detector was fitted on "
                    f"({self.dims_[name]}, *, {self.sizes_[j]})"
                )

    def _fit(self, clean, adversarial, noise, train):
        negs = [clean] if noise is None else [clean, noise]
        self.nets_, self.norm_, self.sizes_, self.epochs_ = [], [], [], []
        for j, name in enumerate(self.layers_):
            maps_neg = torch.cat([n.raw_map(name).float() for n in negs])
            self.sizes_.append(int(maps_neg.shape[-1]))
            mean = maps_neg.mean((0, 2, 3), keepdim=True)[0]
            std = maps_neg.std((0, 2, 3), keepdim=True)[0].clamp_min(1e-6)
            self.norm_.append((mean, std))
            X = torch.cat([torch.cat([self._maps(n, j) for n in negs]), self._maps(adversarial, j)])
            y = torch.cat([torch.zeros(len(maps_neg)), torch.ones(len(adversarial))])
            self.nets_.append(self._train(X, y, int(maps_neg.shape[1]), self.sizes_[j], self.seed + j))
        return self._fit_scores(clean, adversarial, noise)

    def _train(self, X: torch.Tensor, y: torch.Tensor, channels: int, size: int, seed: int) -> nn.Sequential:
        """Adam on class-balanced BCE until the loss on a held-out fifth of the fit data stops improving for
        ``patience`` epochs (at most ``epochs``); the best epoch's weights are kept."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = detector_net(channels, size, self.width)
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(X), generator=gen)
        held = order[: max(1, len(X) // 5)] if self.patience else order[:0]
        fit = order[len(held) :]
        opt = torch.optim.Adam(net.parameters(), lr=self.lr)
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=(y == 0).sum() / (y == 1).sum().clamp_min(1))
        best, best_loss, stale, epochs = copy.deepcopy(net.state_dict()), float("inf"), 0, 0
        while epochs < self.epochs:
            epochs += 1
            net.train()
            for idx in fit[torch.randperm(len(fit), generator=gen)].split(self.batch_size):
                opt.zero_grad()
                loss_fn(net(X[idx]), y[idx]).backward()
                opt.step()
            if not self.patience:
                continue
            with torch.no_grad():
                net.eval()
                loss = float(loss_fn(net(X[held]), y[held]))
            if loss < best_loss - 1e-4:
                best, best_loss, stale = copy.deepcopy(net.state_dict()), loss, 0
            else:
                stale += 1
            if stale >= self.patience:
                break
        self.epochs_.append(epochs)
        if self.patience:
            net.load_state_dict(best)
        return net.eval()

    @torch.no_grad()
    def _layer_scores(self, x: Features) -> np.ndarray:
        if self.session_ is not None:
            feeds = {f"map{j}": x.raw_map(name).float().numpy() for j, name in enumerate(self.layers_)}
            self._check_maps(x)
            return self.session_.run(None, feeds)[0].astype(np.float64)
        cols = []
        for j, net in enumerate(self.nets_):
            maps = self._maps(x, j)
            cols.append(torch.cat([net(b) for b in maps.split(256)]) if len(maps) else torch.zeros(0))
        return torch.stack(cols, 1).double().numpy()

    def use_onnxruntime(self) -> DNN:
        """Score with the standardisation and the per-layer nets in one onnxruntime session: several times faster
        than torch on CPU for these small convolutions (equal to torch's scores within float32 rounding)."""
        import onnxruntime as ort

        self._check_fitted()
        nets = _Nets(self.nets_, self.norm_)
        example = tuple(torch.zeros(2, self.dims_[n], s, s) for n, s in zip(self.layers_, self.sizes_, strict=True))
        names = [f"map{j}" for j in range(len(example))]
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(nets, example, buffer, input_names=names, output_names=["logits"], dynamo=False,
                              dynamic_axes={n: {0: "batch"} for n in [*names, "logits"]})  # fmt: skip
        self.session_ = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
        return self

    def _state(self):
        state = {"sizes": np.array(self.sizes_)}
        for j, net in enumerate(self.nets_):
            state[f"mean{j}"], state[f"std{j}"] = self.norm_[j][0].numpy(), self.norm_[j][1].numpy()
            state.update({f"net{j}/{k}": v.numpy() for k, v in net.state_dict().items()})
        return state

    def _set_state(self, arrays):
        self.sizes_ = [int(s) for s in arrays["sizes"]]
        self.nets_, self.norm_ = [], []
        for j, name in enumerate(self.layers_):
            self.norm_.append((torch.from_numpy(arrays[f"mean{j}"]), torch.from_numpy(arrays[f"std{j}"])))
            net = detector_net(self.dims_[name], self.sizes_[j], self.width)
            prefix = f"net{j}/"
            net.load_state_dict(
                {k[len(prefix) :]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith(prefix)}
            )
            self.nets_.append(net.eval())


class _Nets(nn.Module):
    """Every layer's standardisation and net in one module: raw maps in, (N, L) logits out (for export)."""

    def __init__(self, nets: list[nn.Sequential], norm: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__()
        self.nets = nn.ModuleList(nets)
        self.norm = norm

    def forward(self, *maps: torch.Tensor) -> torch.Tensor:
        return torch.stack([net((m - mu) / sd) for net, m, (mu, sd) in zip(self.nets, maps, self.norm, strict=True)], 1)
