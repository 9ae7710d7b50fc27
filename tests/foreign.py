"""Builders for tests/test_foreign_models.py: an image folder with rare classes and an ONNX classifier written
with onnx's own helper API (NHWC input, softmax output) whose head is fitted to that folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from sklearn.linear_model import LogisticRegression

BRIGHTNESS = {"dark": 0.25, "bright": 0.7, "mid": 0.47, "absent": 0.0}  # class -> mean pixel value
THRESHOLDS = np.array([0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], dtype=np.float32)  # relu1 channel c: relu(x - t_c)
SIZE = 16


def image_folder(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    """``root/<class>/<i>.png``: noisy grey-ish images whose brightness is the class's (0 images: an empty folder)."""
    rng = np.random.default_rng(seed)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.normal(BRIGHTNESS[cls] * 255, 30, (SIZE, SIZE, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / cls / f"{i}.png")
    return root


def _features(images: np.ndarray) -> np.ndarray:
    """What the graph's GAP computes for NHWC images in [0, 1]: the mean of relu(x - t) per threshold (the 3x3
    mean filter and the zero residual branch aside, which change it little)."""
    x = images.mean(axis=3, keepdims=True)
    return np.maximum(x - THRESHOLDS, 0).mean(axis=(1, 2))


def softmax_classifier(path: Path, counts: dict[str, int], seed: int = 0) -> Path:
    """An ONNX graph (NHWC input in [0, 1], softmax probabilities) with a residual block and a dense head; the
    head is fitted by logistic regression on images like those of :func:`image_folder`."""
    rng = np.random.default_rng(seed + 1)
    classes = list(counts)
    x, y = [], []
    for label, cls in enumerate(classes):
        n = max(counts[cls], 0)
        x.append(np.clip(rng.normal(BRIGHTNESS[cls], 30 / 255, (n, SIZE, SIZE, 3)), 0, 1))
        y += [label] * n
    feats, y = _features(np.concatenate(x)), np.array(y)
    head = LogisticRegression(C=100.0, max_iter=2000).fit(feats, y)
    w4 = np.full((len(classes), len(THRESHOLDS)), 0.0, np.float32)
    b4 = np.full(len(classes), -20.0, np.float32)  # classes without training images are never predicted
    w4[head.classes_] = head.coef_ if len(head.classes_) > 2 else np.stack([-head.coef_[0], head.coef_[0]])
    b4[head.classes_] = head.intercept_ if len(head.classes_) > 2 else [-head.intercept_[0], head.intercept_[0]]
    c = len(THRESHOLDS)
    weights = {
        "w1": np.full((c, 3, 3, 3), 1 / 27, np.float32),  # each channel: the 3x3 mean over RGB, minus t_c
        "b1": -THRESHOLDS,
        "w2": np.zeros((c, c, 3, 3), np.float32),
        "b2": np.zeros(c, np.float32),
        "w3": np.eye(c, dtype=np.float32),
        "b3": np.zeros(c, np.float32),
        "w4": w4,
        "b4": b4,
    }
    nodes = [
        helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2], name="to_nchw"),
        helper.make_node("Conv", ["x_nchw", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="stem/conv"),
        helper.make_node("Relu", ["c1"], ["r1"], name="stem/relu"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="block/conv"),
        helper.make_node("Add", ["c2", "r1"], ["s"], name="block/add"),
        helper.make_node("Relu", ["s"], ["r2"], name="block/relu"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["h"], transB=1, name="head/fc1"),
        helper.make_node("Relu", ["h"], ["hr"], name="head/relu"),
        helper.make_node("Gemm", ["hr", "w4", "b4"], ["z"], transB=1, name="head/fc2"),
        helper.make_node("Softmax", ["z"], ["probabilities"], axis=1, name="softmax"),
    ]
    graph = helper.make_graph(
        nodes,
        "vendor_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", len(classes)])],
        [numpy_helper.from_array(np.ascontiguousarray(v, dtype=np.float32), k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
