"""Measurements of the deployed model: accuracy from the ONNX file, params, MACs, bytes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from compsearch.objectives.catalog import INPUT_NAME
from compsearch.objectives.data import Dataset, Split, normalize


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, channels: int, resolution: int) -> int:
    """Multiply-accumulates per image, by ptflops' aten backend (convolutions, linear)."""
    from ptflops import get_model_complexity_info

    model = model.eval()
    macs, _ = get_model_complexity_info(
        model,
        (channels, resolution, resolution),
        as_strings=False,
        print_per_layer_stat=False,
        verbose=False,
        backend="aten",
    )
    return int(macs)


def file_size_kb(path: Path) -> float:
    return os.path.getsize(path) / 1000


def onnx_session(path: Path, fused: bool = True) -> ort.InferenceSession:
    """A CPU session of the file. `fused=False` turns graph optimizations off: an int8
    file's quantize-dequantize pairs then run as written, in float, instead of fused
    into integer kernels, which gives the file's arithmetic whatever the CPU's kernels."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    if not fused:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_predict(
    path: Path,
    split: Split,
    data: Dataset,
    resolution: int,
    batch_size: int = 512,
    fused: bool = True,
) -> np.ndarray:
    """Predicted class of every image of `split`, running the ONNX file in onnxruntime
    (`fused`: see onnx_session)."""
    session = onnx_session(path, fused)
    predictions = []
    for start in range(0, len(split), batch_size):
        x = normalize(split.images[start : start + batch_size], data.mean, data.std, resolution)
        logits = session.run(None, {INPUT_NAME: x.contiguous().numpy()})[0]
        predictions.append(logits.argmax(1))
    return np.concatenate(predictions)


def onnx_accuracy(
    path: Path, split: Split, data: Dataset, resolution: int, fused: bool = True
) -> float:
    predictions = onnx_predict(path, split, data, resolution, fused=fused)
    return float((predictions == split.labels.numpy()).mean())


def calibration_images(data: Dataset, resolution: int, count: int, seed: int) -> np.ndarray:
    """`count` training images, normalized, for int8 calibration."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(data.train), generator=generator)[:count]
    x = normalize(data.train.images[index], data.mean, data.std, resolution)
    return x.contiguous().numpy()
