"""Exported files: what onnxruntime runs matches torch, sizes are real bytes."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from conftest import sampled_configs

from compsearch.objectives.compress import WEIGHT_LEVELS, export, export_fp32, prune, to_int8
from compsearch.objectives.measure import file_size_kb, onnx_session
from compsearch.spaces.builder import build
from compsearch.spaces.config import ArchConfig, CompressConfig, StageConfig
from compsearch.spaces.estimate import count_layers, estimate, onnx_bytes
from compsearch.spaces.space import SearchSpace

CONV_HEAVY = ArchConfig(
    in_channels=3,
    num_classes=10,
    stem_width=32,
    stem_kernel_size=3,
    activation="relu",
    leaky_relu_slope=0.1,
    stages=(
        StageConfig("basic", 2, 64, 3, 2, (64, 64), True),
        StageConfig("basic", 2, 96, 3, 2, (96, 96), True),
    ),
)


def trained_like(arch: ArchConfig) -> torch.nn.Module:
    """A model with non-trivial batch-norm statistics, as after training."""
    torch.manual_seed(0)
    model = build(arch)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def run(path, x: np.ndarray) -> np.ndarray:
    return onnx_session(path).run(None, {"input": x})[0]


def test_fp32_onnx_matches_torch(tmp_path):
    model = trained_like(CONV_HEAVY)
    x = torch.randn(6, 3, 16, 16)
    path = export(model, "fp32", 16, 3, tmp_path / "m.onnx")
    np.testing.assert_allclose(
        run(path, x.numpy()), model(x).detach().numpy(), atol=1e-4, rtol=1e-4
    )


def test_fp16_onnx_is_half_the_size_and_close(tmp_path):
    model = trained_like(CONV_HEAVY)
    x = torch.randn(6, 3, 16, 16)
    fp32 = export(model, "fp32", 16, 3, tmp_path / "fp32.onnx")
    fp16 = export(model, "fp16", 16, 3, tmp_path / "fp16.onnx")
    assert 0.45 < fp16.stat().st_size / fp32.stat().st_size < 0.55
    np.testing.assert_allclose(
        run(fp16, x.numpy()), model(x).detach().numpy(), atol=0.05, rtol=0.05
    )


def test_int8_file_holds_int8_weights_and_is_near_a_quarter(tmp_path):
    model = trained_like(CONV_HEAVY)
    calibration = np.random.default_rng(0).normal(size=(64, 3, 16, 16)).astype(np.float32)
    fp32 = export(model, "fp32", 16, 3, tmp_path / "fp32.onnx")
    int8 = export(model, "int8", 16, 3, tmp_path / "int8.onnx", calibration)
    ratio = int8.stat().st_size / fp32.stat().st_size
    assert 0.24 < ratio < 0.32, ratio
    graph = onnx.load(int8).graph
    conv_weights = [t for t in graph.initializer if len(t.dims) == 4]
    assert conv_weights and all(t.data_type == onnx.TensorProto.INT8 for t in conv_weights)
    assert sum(n.op_type == "DequantizeLinear" for n in graph.node) >= len(conv_weights)
    # Still the same classifier: int8 logits stay near the fp32 ones.
    x = calibration[:16]
    reference = model(torch.from_numpy(x)).detach().numpy()
    assert np.abs(run(int8, x) - reference).mean() < 0.1 * np.abs(reference).mean() + 0.05


def test_int8_weights_stay_within_what_integer_kernels_sum_without_saturating(tmp_path):
    """A convolution whose weights and inputs are all large and positive: onnxruntime's
    uint8 x int8 kernel on x86 without VNNI sums products in pairs in int16, which
    255 x 127 x 2 overflows. The file's weights stop at 64, so the fused integer run
    computes what the file's arithmetic says (run unfused, in float) on every CPU."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 3, padding=1)
    ).eval()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.uniform_(0.9, 1.0)
    calibration = np.random.default_rng(0).uniform(size=(64, 16, 16, 16)).astype(np.float32)
    path = tmp_path / "int8.onnx"
    onnx.save(to_int8(export_fp32(model, 16, 16), calibration), path)
    largest = max(
        np.abs(onnx.numpy_helper.to_array(t)).max()
        for t in onnx.load(path).graph.initializer
        if t.data_type == onnx.TensorProto.INT8
    )
    x = calibration[:16]
    fused = onnx_session(path).run(None, {"input": x})[0]
    arithmetic = onnx_session(path, fused=False).run(None, {"input": x})[0]
    off = np.abs(fused - arithmetic).max() / np.abs(arithmetic).max()
    assert largest == WEIGHT_LEVELS
    assert off < 0.02, off


def test_size_kb_is_the_files_bytes_over_1000(tmp_path):
    path = export(trained_like(CONV_HEAVY), "fp32", 16, 3, tmp_path / "m.onnx")
    assert file_size_kb(path) == path.stat().st_size / 1000


def check_byte_estimates(folder, precision: str, configs: list) -> None:
    """The estimate from the config alone is within 2% of the exported file, pruned or not."""
    calibration = np.random.default_rng(0).normal(size=(32, 1, 8, 8)).astype(np.float32)
    for config in configs:
        model = trained_like(config.arch)
        compress = CompressConfig(precision, config.compress.prune_fraction)  # local, L2
        arch = prune(model, config.arch, compress, torch.zeros(1, 1, 8, 8))
        path = export(model, precision, 8, 1, folder / "m.onnx", calibration)
        expected = onnx_bytes(count_layers(arch, 8), precision, arch.activation)
        assert estimate(dataclasses.replace(config, compress=compress)).file_bytes == expected
        assert abs(expected / path.stat().st_size - 1) < 0.02, (precision, config.arch)


BYTES_SPACE = SearchSpace(
    in_channels=1, num_classes=10, test_resolution=8, width=(4, 48), stem_width=(4, 24)
)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_byte_estimate_within_two_percent(tmp_path, precision):
    check_byte_estimates(tmp_path, precision, sampled_configs(BYTES_SPACE, 10, seed=11))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_byte_estimate_within_two_percent_for_hundreds_of_configs(tmp_path, precision):
    check_byte_estimates(tmp_path, precision, sampled_configs(BYTES_SPACE, 200, seed=12))
