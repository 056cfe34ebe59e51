"""int8 `.tflite` files for microcontrollers (`export --format tflite`).

The model is converted to a float `.tflite` file by litert-torch, then quantized by
ai-edge-quantizer's static int8 recipe (int8 weights per output channel, int8 activations
whose ranges come from calibration images, int8 input and output), and run in LiteRT's
interpreter (ai-edge-litert) to measure it. All three come with the optional extra
`compsearch[tflite]` and are imported only here, only when a `.tflite` file is asked for.

The quantizer calibrates the float file itself rather than taking the ranges onnxruntime's
quantizer chose for the ONNX file: a quantization-aware model's weights are those it
tuned, but its activation ranges are calibrated again, on the same images and by the
same rule (each tensor's lowest and highest value, `extreme_ranges`).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compsearch.objectives.data import Dataset, Split, normalize
from compsearch.spaces.memory import Graph, Operator, peak_bytes

TFLITE_MODULES = ("litert_torch", "ai_edge_quantizer", "ai_edge_litert")
INSTALL = "pip install 'compsearch[tflite]'"
SIGNATURE = "serving_default"  # litert-torch's one signature
# The C array's name in model_data.cc and model_data.h, as TensorFlow Lite Micro's
# examples name it.
ARRAY_NAME = "g_model"
LATENCY_RUNS = 50  # timed single-image invocations, after as many to warm up


def package_versions() -> dict[str, str]:
    return {
        package: importlib.metadata.version(package)
        for package in ("litert-torch", "ai-edge-litert", "ai-edge-quantizer")
    }


def missing_tflite() -> str | None:
    """Why `.tflite` files cannot be written here (the package that is missing), or None."""
    for module in TFLITE_MODULES:
        if importlib.util.find_spec(module) is None:
            return f"--format tflite needs the package {module.replace('_', '-')}: {INSTALL}"
    return None


@dataclass(frozen=True)
class Quantization:
    """How a float value maps to the file's int8: value = scale * (int8 - zero_point)."""

    scale: float
    zero_point: int

    def quantize(self, values: np.ndarray) -> np.ndarray:
        return np.clip(np.round(values / self.scale) + self.zero_point, -128, 127).astype(np.int8)

    def dequantize(self, values: np.ndarray) -> np.ndarray:
        return self.scale * (values.astype(np.float32) - self.zero_point)


@dataclass(frozen=True)
class TfliteFile:
    path: Path
    input: Quantization
    output: Quantization


CALIBRATIONS = ("extremes", "moving-average")


def write_tflite(
    model: nn.Module, calibration: np.ndarray, path: Path, ranges: str = "extremes"
) -> TfliteFile:
    """Convert `model` (its float weights, on any device) into an int8 `.tflite` file at
    `path`, its activations calibrated on `calibration` (normalized images, NCHW): each
    tensor's range is the lowest and highest value it took (`extreme_ranges`), or with
    `ranges` "moving-average" the quantizer's own running average of each image's (kept
    to compare, bench/tflite_calibration.py)."""
    if ranges not in CALIBRATIONS:
        raise ValueError(f"unknown ranges {ranges!r}; valid: {', '.join(CALIBRATIONS)}")
    import litert_torch
    from ai_edge_quantizer import quantizer, recipe

    # The trainer keeps weights channels-last; quantized from such weights, the file
    # computed nonsense (a digits model: 8% against 99% in int8; its float file was right).
    model = copy.deepcopy(model).float().cpu().eval().to(memory_format=torch.contiguous_format)
    sample = torch.from_numpy(np.ascontiguousarray(calibration[:1], dtype=np.float32))
    with (
        tempfile.TemporaryDirectory(dir=path.parent, prefix=".tflite-") as work,
        silenced(),
        # Without gradients, a strided 1x1 convolution exports as itself; with them, as
        # the subsampling it trains by (spaces/layers.py StridedPointwise): two
        # STRIDED_SLICE operators and their tensors more in the file.
        torch.no_grad(),
    ):
        float_path = Path(work) / "float.tflite"
        litert_torch.convert(model, (sample,)).export(str(float_path))
        tool = quantizer.Quantizer(str(float_path), recipe.static_wi8_ai8())
        name = input_name(float_path)
        images = calibration.astype(np.float32)
        if ranges == "extremes":
            found = extreme_ranges(tool, name, images)
        else:
            found = tool.calibrate({SIGNATURE: [{name: x[None]} for x in images]}, num_threads=1)
        widen(found)
        tool.quantize(found, enable_progress_report=False).export_model(path, overwrite=True)
    strip_names(path)
    interpreter = load(path)
    return TfliteFile(
        path,
        quantization(interpreter.get_input_details()[0]),
        quantization(interpreter.get_output_details()[0]),
    )


# The narrowest range calibration may leave a tensor. A tensor that was zero on every
# calibration image (a unit no image wakes) gets a range of width 0 otherwise; the biases
# of the layer reading it are then quantized by a scale of 0 and LiteRT's interpreter
# aborts the whole process when it loads the file (found on a sampled config,
# bench/calibrate_onnx_bytes.py --format tflite).
NARROWEST_RANGE = 0.01


def extreme_ranges(tool, name: str, images: np.ndarray) -> dict:
    """Each tensor's range over every calibration image: the lowest and highest values it
    took, as onnxruntime's min-max calibration of the ONNX file has them.

    ai-edge-quantizer's calibration keeps a moving average of each image's minimum and
    maximum (weight 0.95 on the past), which is narrower than the values seen: the
    logits' range then ends below the larger logits, which saturate at 127 and tie, and
    the first class among them wins. On a CIFAR-10 trial that cost 3 points against its
    ONNX int8 file. So each image is calibrated alone (a first update takes its values
    as they are) and the ranges are joined here."""
    joined: dict = {}
    for image in images:
        found = tool.calibrate({SIGNATURE: [{name: image[None]}]}, num_threads=1)
        for tensor, values in found.items():
            if tensor not in joined or "min" not in values or "max" not in values:
                joined[tensor] = dict(values)
                continue
            seen = joined[tensor]
            seen["min"] = np.minimum(seen["min"], values["min"])
            seen["max"] = np.maximum(seen["max"], values["max"])
    return joined


def widen(ranges: dict) -> None:
    """Every calibrated range at least NARROWEST_RANGE wide, in place."""
    for values in ranges.values():
        if "min" in values and "max" in values:
            values["max"] = np.maximum(values["max"], values["min"] + NARROWEST_RANGE)


@contextlib.contextmanager
def silenced():
    """Output to the terminal goes nowhere meanwhile: the converter and the quantizer
    print their progress (rich, tqdm) and their C++ logs there, over compsearch's own
    progress display. Their errors still come as exceptions."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with (
            open(os.devnull, "w") as null,
            contextlib.redirect_stdout(null),  # Python's writers, wherever sys.stdout goes
            contextlib.redirect_stderr(null),
        ):
            os.dup2(null.fileno(), 1)  # C++'s, and Python's that hold the terminal's
            os.dup2(null.fileno(), 2)
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for descriptor, copied in zip((1, 2), saved, strict=True):
            os.dup2(copied, descriptor)
            os.close(copied)


def strip_names(path: Path) -> None:
    """Drop the file's tensor names and signature, which no runtime needs to run it: the
    converter names each tensor by its module path: 19,280 of ResNet-8's 112,160 bytes
    (bench/tflite_anchors.py, before and after)."""
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    flatbuffer_utils.strip_strings(model)
    flatbuffer_utils.write_model(model, str(path))


def load(path: Path, threads: int | None = None):
    """LiteRT's interpreter of the file with its builtin kernels, without the XNNPACK
    delegate it adds by default: XNNPACK refuses some int8 files these write (a grouped
    convolution's: "failed to create XNNPACK runtime", bench/calibrate_onnx_bytes.py
    --format tflite), and a microcontroller runs builtin kernels (TensorFlow Lite Micro
    has no XNNPACK)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    with silenced():
        interpreter = Interpreter(
            model_path=str(path),
            num_threads=threads,
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
        interpreter.allocate_tensors()
    return interpreter


def input_name(path: Path) -> str:
    return next(iter(load(path).get_signature_list()[SIGNATURE]["inputs"]))


def quantization(detail: dict) -> Quantization:
    scale, zero_point = detail["quantization"]
    return Quantization(float(scale), int(zero_point))


def tflite_logits(path: Path, images: np.ndarray) -> np.ndarray:
    """The file's dequantized outputs for normalized `images` (NCHW), one at a time, as a
    microcontroller runs it."""
    return run_images(load(path), images)


def run_images(interpreter, images: np.ndarray) -> np.ndarray:
    """`tflite_logits` on an interpreter already loaded."""
    given, returned = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    into, out_of = quantization(given), quantization(returned)
    logits = []
    for image in images:
        interpreter.set_tensor(given["index"], into.quantize(image[None]))
        interpreter.invoke()
        logits.append(out_of.dequantize(interpreter.get_tensor(returned["index"])[0]))
    return np.stack(logits)


def tflite_accuracy(path: Path, split: Split, data: Dataset, resolution: int) -> float:
    """Top-1 of the file on `split`, run in LiteRT's interpreter (loaded once), 512
    images normalized at a time."""
    interpreter = load(path)
    correct = 0
    for start in range(0, len(split), 512):
        x = normalize(split.images[start : start + 512], data.mean, data.std, resolution)
        predicted = run_images(interpreter, x.numpy()).argmax(1)
        correct += int((predicted == split.labels[start : start + 512].numpy()).sum())
    return correct / len(split)


def tflite_latency_ms(path: Path) -> float:
    """Median single-image latency of the file in LiteRT's interpreter, one thread,
    after warm-up."""
    interpreter = load(path, threads=1)
    given = interpreter.get_input_details()[0]
    interpreter.set_tensor(given["index"], np.zeros(given["shape"], dtype=given["dtype"]))
    for _ in range(LATENCY_RUNS):
        interpreter.invoke()
    seconds = []
    for _ in range(LATENCY_RUNS):
        started = time.perf_counter()
        interpreter.invoke()
        seconds.append(time.perf_counter() - started)
    return 1000 * statistics.median(seconds)


def tflite_graph(path: Path) -> Graph:
    """The file's operators over its activation tensors (those an operator writes, and the
    input), in the file's order, each tensor at its bytes; weights are left out."""
    from ai_edge_quantizer.utils.tfl_flatbuffer_utils import read_model

    interpreter = load(path)
    details = {detail["index"]: detail for detail in interpreter.get_tensor_details()}
    operators = read_model(path.read_bytes()).subgraphs[0].operators  # in the file's order
    written = {int(index) for operator in operators for index in operator.outputs}
    given = [detail["index"] for detail in interpreter.get_input_details()]
    activations = written | set(given)
    graph = Graph()
    number = {}
    for index in sorted(activations):
        detail = details[index]
        size = int(np.prod(detail["shape"])) * np.dtype(detail["dtype"]).itemsize
        number[index] = graph.tensor(size)
    graph.inputs = [number[index] for index in given]
    graph.outputs = [number[detail["index"]] for detail in interpreter.get_output_details()]
    for operator in operators:
        graph.operators.append(
            Operator(
                str(operator.opcodeIndex),
                tuple(number[int(i)] for i in operator.inputs if int(i) in activations),
                tuple(number[int(i)] for i in operator.outputs),
            )
        )
    return graph


def tflite_ram_kb(path: Path) -> float:
    """Peak activation memory of one inference of the file, under the schedule
    spaces/memory.py counts (each operator holds its inputs and outputs at once)."""
    return peak_bytes(tflite_graph(path)) / 1000


def c_array(path: Path, source: Path, header: Path) -> None:
    """`source` (.cc) holding the file's bytes as a C array aligned to 16 bytes, as
    TensorFlow Lite Micro reads a model from flash, and `header` (.h) declaring it."""
    data = path.read_bytes()
    rows = [
        "  " + ", ".join(f"0x{byte:02x}" for byte in data[start : start + 12]) + ","
        for start in range(0, len(data), 12)
    ]
    header.write_text(
        f"// {path.name}: {len(data)} bytes, an int8 model for TensorFlow Lite Micro.\n"
        "#pragma once\n\n"
        f"extern const unsigned char {ARRAY_NAME}[];\n"
        f"extern const unsigned int {ARRAY_NAME}_len;\n"
    )
    source.write_text(
        f'#include "{header.name}"\n\n'
        f"alignas(16) const unsigned char {ARRAY_NAME}[] = {{\n"
        + "\n".join(rows)
        + f"\n}};\nconst unsigned int {ARRAY_NAME}_len = {len(data)};\n"
    )
