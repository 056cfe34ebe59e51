"""The microcontroller format: an int8 .tflite file through litert-torch, measured in the
LiteRT interpreter; skipped, with the reason, where the tflite extra is not installed."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
import torch

from compsearch.objectives import tflite as tflite_module
from compsearch.objectives.compress import export
from compsearch.objectives.data import load_dataset
from compsearch.objectives.measure import calibration_images, onnx_accuracy
from compsearch.objectives.memory import peak_activation_bytes
from compsearch.objectives.teacher import residual_arch
from compsearch.objectives.tflite import missing_reason
from compsearch.objectives.train import DeviceData, Phase, fit
from compsearch.search.common import UsageError
from compsearch.search.options import ExportOptions
from compsearch.spaces.builder import build

needs_extra = pytest.mark.skipif(missing_reason() is not None, reason=str(missing_reason()))


def test_an_unknown_format_or_a_missing_extra_is_refused_before_any_work(monkeypatch):
    with pytest.raises(UsageError, match="unknown --format 'tf'; choose one of onnx, tflite"):
        ExportOptions(format="tf")
    monkeypatch.setattr(
        tflite_module, "missing_reason", lambda: "the tflite extra is not installed"
    )
    with pytest.raises(UsageError, match="--format tflite needs the tflite extra"):
        ExportOptions(format="tflite")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A ResNet-8 shape 8/16/32 trained on digits for 4 epochs, with its int8 ONNX file."""
    data = load_dataset("digits", seed=0)
    on_device = DeviceData(data, "cpu")
    torch.manual_seed(0)
    model = build(residual_arch(1, 10, (8, 16, 32), 1)).to(memory_format=torch.channels_last)
    phase = Phase(8, 4, 0.1, 0.15, 32, 5e-4, 0.1)
    fit(model, on_device, phase, torch.Generator().manual_seed(0))
    model = model.eval()
    calibration = calibration_images(data, 8, 256, seed=0)
    folder = tmp_path_factory.mktemp("tflite")
    onnx_path = export(model, "int8", 8, 1, folder / "model.onnx", calibration)
    return data, model, calibration, folder, onnx_path


@needs_extra
def test_the_tflite_file_is_int8_and_as_accurate_as_the_onnx_int8_file(trained):
    data, model, calibration, folder, onnx_path = trained
    path = tflite_module.export_tflite(model, 1, 8, calibration, folder / "model.tflite")
    runner = tflite_module.interpreter(path)
    assert runner.get_input_details()[0]["dtype"] == np.int8
    ours = onnx_accuracy(onnx_path, data.test, data, 8)
    theirs = tflite_module.tflite_accuracy(path, data.test, data, 8)
    assert ours > 0.8  # trained: chance is 0.1
    assert abs(theirs - ours) <= 0.02, (theirs, ours)
    # Its peak memory, counted on its own graph, is the ONNX int8 file's within a few
    # bytes (its int8 logits, and layout transposes that fit inside the peak).
    onnx_peak = peak_activation_bytes(onnx.load(onnx_path))
    assert onnx_peak <= tflite_module.tflite_peak_bytes(path) <= 1.1 * onnx_peak


@needs_extra
def test_the_c_array_holds_the_file_s_bytes(trained, tmp_path):
    _, model, calibration, _, _ = trained
    path = tflite_module.export_tflite(model, 1, 8, calibration, tmp_path / "m.tflite")
    text = tflite_module.write_c_array(path, tmp_path / "m.cc").read_text()
    values = bytes(int(v, 16) for v in re.findall(r"0x([0-9a-f]{2})", text))
    assert values == path.read_bytes()
    assert f"model_tflite_len = {len(values)};" in text
    assert "alignas(16)" in text
