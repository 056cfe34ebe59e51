"""bench/int8_loss.py takes today's int8 file apart: which quantized tensor is of which
kind, and the file with some of them back in float."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from compsearch.objectives.compress import CALIBRATION_METHODS, to_int8
from compsearch.objectives.measure import onnx_session
from compsearch.spaces.builder import build
from compsearch.spaces.config import ArchConfig
from compsearch.spaces.space import make_stage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
try:
    from int8_loss import KINDS, kinds, prepared_fp32, unquantized
finally:
    sys.path.pop(0)


def network(activation: str) -> torch.nn.Module:
    """A residual block with a shortcut convolution, then an inverted block with a
    squeeze-and-excitation gate and an identity shortcut, on 1x8x8 images."""
    stages = (
        make_stage("basic", 1, 8, 16, 3, 2, 1, 1, False),
        make_stage("inverted", 1, 16, 16, 3, 1, 2, 1, True),
    )
    torch.manual_seed(0)
    model = build(ArchConfig(1, 4, 8, 3, activation, 0.01, stages))
    for module in model.modules():  # statistics other than the identity, as if trained
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def logits(model: onnx.ModelProto, x: np.ndarray, tmp_path: Path, name: str) -> np.ndarray:
    """The file's arithmetic (fusion off): fused, onnxruntime would quantize the float
    weights of a file with only its activations rounded on its own, per tensor."""
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    session = onnx_session(path, fused=False)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(64, 1, 8, 8)).astype(np.float32)


@pytest.mark.parametrize("activation", ["relu", "hardswish"])
def test_every_pair_removed_and_weights_put_back_is_the_fp32_file(activation, images, tmp_path):
    fp32 = prepared_fp32(network(activation), 8, 1)
    int8 = to_int8(fp32, images)
    expected = logits(fp32, images, tmp_path, "fp32")
    rounded = logits(int8, images, tmp_path, "int8")
    assert not np.allclose(rounded, expected, atol=1e-4)  # int8 does round
    back = unquantized(int8, fp32, lambda name: True, weights_float=True)
    # With ReLU, the int8 file drops the ReLU into the rounding; removing the pair puts it
    # back, or the network would compute something else.
    np.testing.assert_allclose(logits(back, images, tmp_path, "back"), expected, atol=1e-4)


def test_weights_alone_in_float_leave_the_activations_rounded(images, tmp_path):
    fp32 = prepared_fp32(network("relu"), 8, 1)
    int8 = to_int8(fp32, images)
    activations_only = unquantized(int8, fp32, lambda name: False, weights_float=True)
    weights_only = unquantized(int8, fp32, lambda name: True, weights_float=False)
    expected = logits(fp32, images, tmp_path, "fp32")
    for model in (activations_only, weights_only):
        got = logits(model, images, tmp_path, "part")
        assert not np.allclose(got, expected, atol=1e-4)
        # Half of the rounding is closer to fp32 than all of it.
        full = np.abs(logits(int8, images, tmp_path, "int8") - expected).mean()
        assert np.abs(got - expected).mean() < full


def test_every_quantized_activation_has_its_kind(images):
    fp32 = prepared_fp32(network("hardswish"), 8, 1)
    kind_of = kinds(to_int8(fp32, images), fp32)
    assert set(kind_of.values()) <= set(KINDS)
    assert kind_of["input"] == "input"
    found = set(kind_of.values())
    assert {"convolution outputs", "activations", "shortcuts", "squeeze-excitation"} <= found
    assert "classifier" in found
    squeeze = [name for name, kind in kind_of.items() if kind == "squeeze-excitation"]
    assert squeeze and all("/blocks/blocks.1/" in name for name in squeeze)  # only block 2's
    assert kind_of["/blocks/blocks.0/shortcut/shortcut.0/Conv_output_0"] == "shortcuts"


def test_to_int8_takes_each_calibration_method_and_refuses_others(images):
    fp32 = prepared_fp32(network("relu"), 8, 1)
    scales = {}
    for method in CALIBRATION_METHODS:
        model = to_int8(fp32, images, method)
        scales[method] = next(
            float(onnx.numpy_helper.to_array(t))
            for t in model.graph.initializer
            if t.name == "input_scale"
        )
    assert len(set(scales.values())) > 1  # the methods choose different ranges
    with pytest.raises(ValueError, match="unknown calibration method 'mse'"):
        to_int8(fp32, images, "mse")
