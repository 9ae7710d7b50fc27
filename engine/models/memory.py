"""Batch sizes from the memory a model needs per image and the memory the machine has.

At clinical resolution one image's activations are large (VGG-16 at 224 px: ~100 MB kept for an input gradient,
13 MB for its first feature map alone), so a fixed batch size that suits 64 px runs out of memory at 224 px.
:func:`auto_batch_size` measures one image (a real forward pass of one image): the bytes
autograd keeps for the backward pass (attacks), or the largest input + output of any layer (inference), and
divides a memory budget by it (:func:`memory_budget`); an explicit batch size always overrides it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import itertools
import os
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

BUDGET_ENV = "HFC_ENGINE_MEMORY_GB"
BUDGET_SHARE = 0.25  # of the available memory, when HFC_ENGINE_MEMORY_GB is not set
CPU_CAP = 2**30  # bytes; also the budget where the available memory cannot be read
GPU_SHARE = 0.5  # of a GPU's free memory
LAYOUT_TOLERANCE = 1e-4  # relative: the largest output change the channels-last layout may make (float rounding)
_MEASURED: weakref.WeakKeyDictionary[nn.Module, dict[tuple, int]] = weakref.WeakKeyDictionary()
_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, torch.memory_format]] = weakref.WeakKeyDictionary()


def _first_tensor(model: nn.Module) -> torch.Tensor | None:
    """The first floating parameter, else buffer (a converted ONNX graph keeps its weights as buffers)."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    return next((t for t in tensors if t.is_floating_point()), None)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's weights (CPU for a model without any)."""
    tensor = _first_tensor(model)
    return tensor.device if tensor is not None else torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of the model's weights (float32 for a model without any)."""
    tensor = _first_tensor(model)
    return tensor.dtype if tensor is not None else torch.float32


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode inside the block, restoring its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _once(table: weakref.WeakKeyDictionary, model: nn.Module, key: tuple, compute: Callable[[], Any]) -> Any:
    """``compute()`` once per model and key, kept while the model lives."""
    per_model = table.setdefault(model, {})
    if key not in per_model:
        per_model[key] = compute()
    return per_model[key]


def input_layout(model: nn.Module, input_shape: Sequence[int]) -> torch.memory_format:
    """The memory layout ``model`` runs fastest on for a batch of ``input_shape`` (C, H, W) images: channels-last on
    the CPU, where oneDNN's convolutions run on it without reordering (PGD measured 1.2x faster for VGG-16 at 240 px,
    ResNet-50 at 224 px and the default 64 px ResNet-18), when the model accepts it and gives the same outputs on one
    image to ``LAYOUT_TOLERANCE``; else (GPUs, other shapes, models that refuse it) the contiguous layout. Decided
    once per model and shape."""
    if len(input_shape) != 3 or model_device(model).type != "cpu":
        return torch.contiguous_format
    return _once(_LAYOUTS, model, tuple(input_shape), lambda: _accepts_channels_last(model, input_shape))


def fast_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The image batch ``x`` in the layout ``model`` runs fastest on (:func:`input_layout`); differentiable, and a
    no-op for other inputs."""
    return x.contiguous(memory_format=input_layout(model, x.shape[1:])) if x.dim() == 4 else x


def _accepts_channels_last(model: nn.Module, input_shape: Sequence[int]) -> torch.memory_format:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(1, *input_shape, generator=generator).to(model_dtype(model))
    with eval_mode(model), torch.no_grad():
        reference = model(x)
        try:
            fast = model(x.contiguous(memory_format=torch.channels_last))
        except RuntimeError:  # e.g. a .view() of a feature map
            return torch.contiguous_format
    if not (isinstance(reference, torch.Tensor) and isinstance(fast, torch.Tensor)) or fast.shape != reference.shape:
        return torch.contiguous_format
    scale = max(1.0, float(reference.abs().max()))
    same = bool(((fast - reference).abs() <= LAYOUT_TOLERANCE * scale).all())
    return torch.channels_last if same else torch.contiguous_format


def memory_budget(device: torch.device | str = "cpu") -> int:
    """Bytes a batch's activations may use: ``HFC_ENGINE_MEMORY_GB``; else on a GPU half its free memory, on the CPU
    a quarter of ``MemAvailable`` (/proc/meminfo), at most ``CPU_CAP`` (larger CPU batches are not faster)."""
    if os.environ.get(BUDGET_ENV):
        return int(float(os.environ[BUDGET_ENV]) * 2**30)
    device = torch.device(device)
    if device.type == "cuda":
        return int(GPU_SHARE * torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            fields = dict(line.split(":", 1) for line in fh)
        return min(CPU_CAP, int(BUDGET_SHARE * int(fields["MemAvailable"].split()[0]) * 1024))
    except (OSError, KeyError, ValueError):
        return CPU_CAP


def bytes_per_image(model: nn.Module, input_shape: Sequence[int], backward: bool) -> int:
    """Activation bytes one image of ``input_shape`` (C, H, W) needs: kept for backward, or at the widest layer
    (measured once per model, shape and direction)."""
    return _once(_MEASURED, model, (tuple(input_shape), backward), lambda: _measure(model, input_shape, backward))


def _measure(model: nn.Module, input_shape: Sequence[int], backward: bool) -> int:
    x = torch.rand(1, *input_shape, device=model_device(model), dtype=model_dtype(model))
    if backward:
        weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in weights:  # weights are shared by the batch, not per image
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with eval_mode(model), torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x.requires_grad_(True))
        return sum(storages.values()) + x.nbytes
    widest = [x.nbytes]

    def hook(module: nn.Module, inputs: tuple, output: object) -> None:
        tensors = [t for t in (*inputs, output) if isinstance(t, torch.Tensor)]
        widest.append(sum(t.nbytes for t in tensors))

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with eval_mode(model), torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return max(widest)


def auto_batch_size(
    model: nn.Module, input_shape: Sequence[int], backward: bool, budget: int | None = None, limit: int = 256
) -> int:
    """The largest batch (1 to ``limit``) whose activations fit ``budget`` bytes (default :func:`memory_budget`)."""
    budget = memory_budget(model_device(model)) if budget is None else budget
    return max(1, min(limit, budget // max(1, bytes_per_image(model, input_shape, backward))))


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    libc = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None


def release_free_memory() -> None:
    """Return the C heap's free pages to the operating system (glibc's ``malloc_trim``; a no-op elsewhere). Tensors
    under glibc's mmap threshold (32 MB once raised: a batch's feature maps) are freed into the heap, which keeps
    them resident; a finished cell's then stay under the next cell's peak."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
