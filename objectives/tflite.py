"""The microcontroller format: an int8 `.tflite` file of a trained model, its accuracy in
the LiteRT interpreter, its peak activation memory, and a C array of it for TensorFlow
Lite Micro. An optional extra (`pip install -e ".[tflite]"`): litert-torch converts, the
LiteRT interpreter (ai-edge-litert) runs.

The conversion is full-integer: PT2E static quantization (per-channel symmetric int8
weights, int8 activations and an int8 input and output) calibrated on the same training
images as the ONNX int8 file, of the same weights (the quantization-aware copy's, when
that is the model exported), then litert-torch's converter.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compsearch.objectives.data import Dataset, Split, normalize
from compsearch.spaces.memory import Graph, Operator, peak_bytes

EXTRA = 'pip install -e ".[tflite]"'
MODULES = ("litert_torch", "ai_edge_litert")


def missing_reason() -> str | None:
    """Why the `.tflite` format cannot be written here, or None when it can."""
    absent = [name for name in MODULES if importlib.util.find_spec(name) is None]
    if absent:
        return f"the tflite extra is not installed ({', '.join(absent)} missing): {EXTRA}"
    return None


def export_tflite(
    model: nn.Module, channels: int, resolution: int, calibration: np.ndarray, path: Path
) -> Path:
    """Write `model` (left untouched) as a full-integer int8 `.tflite` file at `path`,
    its activation ranges calibrated on `calibration` (normalized images, NCHW)."""
    import copy

    import litert_torch
    from litert_torch.quantize.pt2e_quantizer import (
        PT2EQuantizer,
        get_symmetric_quantization_config,
    )
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    model = copy.deepcopy(model).cpu().eval()
    example = (torch.zeros(1, channels, resolution, resolution),)
    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)
    quantizer = PT2EQuantizer().set_global(config)
    with torch.no_grad():
        prepared = prepare_pt2e(torch.export.export(model, example).module(), quantizer)
        move_exported_model_to_eval(prepared)  # batch norms as the file runs them
        for image in torch.from_numpy(calibration):  # the exported graph takes one image
            prepared(image.unsqueeze(0))
        converted = move_exported_model_to_eval(convert_pt2e(prepared, fold_quantize=False))
        edge = litert_torch.convert(
            converted, example, quant_config=QuantConfig(pt2e_quantizer=quantizer)
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    edge.export(str(path))
    return path


def interpreter(path: Path):
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(path), num_threads=1)
    runner.allocate_tensors()
    return runner


def tflite_predict(path: Path, split: Split, data: Dataset, resolution: int) -> np.ndarray:
    """Predicted class of every image of `split`, one at a time through the LiteRT
    interpreter: normalized as for the ONNX file, then quantized as the file's input
    says."""
    runner = interpreter(path)
    source, target = runner.get_input_details()[0], runner.get_output_details()[0]
    scale, zero_point = source["quantization"]
    info = np.iinfo(source["dtype"])
    predictions = []
    for start in range(0, len(split), 512):
        x = normalize(split.images[start : start + 512], data.mean, data.std, resolution)
        x = x.contiguous().numpy()
        if scale:
            x = np.clip(np.round(x / scale + zero_point), info.min, info.max)
        for image in x.astype(source["dtype"]):
            runner.set_tensor(source["index"], image[None])
            runner.invoke()
            # A positive output scale keeps the order: the largest int8 logit wins.
            predictions.append(int(runner.get_tensor(target["index"]).argmax()))
    return np.array(predictions)


def tflite_accuracy(path: Path, split: Split, data: Dataset, resolution: int) -> float:
    predictions = tflite_predict(path, split, data, resolution)
    return float((predictions == split.labels.numpy()).mean())


def tflite_peak_bytes(path: Path) -> int:
    """Peak activation bytes of one inference of the `.tflite` file, counted as
    spaces/memory.py counts an ONNX file: its operators in the file's order (level by
    level), each tensor alive from its writer to its last reader, at its own bytes;
    constants (weights, biases, shapes) not counted, and a reshape's output sharing its
    input's buffer."""
    runner = interpreter(path)
    tensors = {t["index"]: t for t in runner.get_tensor_details()}
    operators = runner._get_ops_details()  # the file's operator list, in order
    written = {index for op in operators for index in op["outputs"]}
    inputs = [d["index"] for d in runner.get_input_details()]
    outputs = [d["index"] for d in runner.get_output_details()]
    holder: dict[int, int] = {}
    graph = Graph()
    numbers: dict[int, int] = {}

    def number(index: int) -> int:
        index = holder.get(index, index)
        if index not in numbers:
            tensor = tensors[index]
            size = int(np.prod(tensor["shape"])) * np.dtype(tensor["dtype"]).itemsize
            numbers[index] = graph.tensor(size)
        return numbers[index]

    for op in operators:
        variable = [i for i in op["inputs"] if i >= 0 and (i in written or i in inputs)]
        if op["op_name"] in ("RESHAPE", "SQUEEZE", "EXPAND_DIMS") and len(variable) == 1:
            holder[op["outputs"][0]] = holder.get(variable[0], variable[0])
            continue
        graph.operators.append(
            Operator(op["op_name"], tuple(map(number, variable)), tuple(map(number, op["outputs"])))
        )
    graph.inputs.extend(map(number, inputs))
    graph.outputs.extend(map(number, outputs))
    return peak_bytes(graph)


def write_c_array(path: Path, target: Path, name: str = "model_tflite") -> Path:
    """`path`'s bytes as a C array for TensorFlow Lite Micro, 16-byte aligned, with its
    length, in `target` (a .cc file)."""
    data = path.read_bytes()
    rows = [
        "  " + ", ".join(f"0x{byte:02x}" for byte in data[start : start + 12]) + ","
        for start in range(0, len(data), 12)
    ]
    text = [
        f"// {path.name}: {len(data)} bytes, written by compsearch export --format tflite.",
        "#include <cstddef>",
        "",
        f"alignas(16) extern const unsigned char {name}[] = {{",
        *rows,
        "};",
        f"extern const size_t {name}_len = {len(data)};",
        "",
    ]
    target.write_text("\n".join(text))
    return target
