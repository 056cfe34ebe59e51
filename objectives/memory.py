"""Peak activation memory of one inference, measured on a deployable ONNX file.

The file is reduced to the operators that write a new tensor and counted as
spaces/memory.py says (sequential, level by level, each tensor alive from its writer to
its last reader), with ONNX shape inference for the shapes and one image per inference:

- each tensor counts at the precision the file stores it in: 4 bytes for fp32, 2 for
  fp16, 1 for int8. A quantize-dequantize pair stands for one int8 tensor, the one a
  quantized runtime writes in place of the float tensor before the pair and reads in
  place of the one after it;
- weights and other constants are not counted (they are the file's bytes), nor are
  operators that only relabel a tensor (Reshape, Flatten, Squeeze, Unsqueeze,
  Identity): their output is their input's buffer. A ReLU that is the only reader of
  its input works in place, as runtimes fuse it into the convolution or sum before it.
"""

from __future__ import annotations

import math
from pathlib import Path

import onnx
from onnx import TensorProto

from compsearch.objectives.compress import sort_topologically
from compsearch.spaces.memory import Graph, Operator, peak_bytes

# Operators whose output shares its input's buffer.
RELABELLING = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})
IN_PLACE = frozenset({"Relu"})  # when the only reader of its input
BYTES = {
    TensorProto.FLOAT: 4,
    TensorProto.FLOAT16: 2,
    TensorProto.BFLOAT16: 2,
    TensorProto.UINT8: 1,
    TensorProto.INT8: 1,
    TensorProto.BOOL: 1,
    TensorProto.INT32: 4,
    TensorProto.INT64: 8,
}


def file_ram_kb(path: Path) -> float:
    """Peak activation memory of one inference of the ONNX file at `path`, in KB (1000
    bytes)."""
    return peak_activation_bytes(onnx.load(path)) / 1000


def peak_activation_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the largest set of tensors alive at once when `model` runs one image."""
    return peak_bytes(reduced_graph(model))


def reduced_graph(model: onnx.ModelProto) -> Graph:
    """The operators of `model` that write a new tensor, over numbered tensors with
    their bytes: what `spaces.memory.peak_bytes` counts."""
    model = one_image(model)
    graph = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    if not in_order(graph):
        sort_topologically(graph)
    constants = {tensor.name for tensor in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    buffer: dict[str, str] = {}  # tensor -> the tensor whose buffer holds it

    def holder(name: str) -> str:
        while name in buffer:
            name = buffer[name]
        return name

    steps: list[onnx.NodeProto] = []
    for node in graph.node:
        source = node.input[0] if node.input else ""
        if node.op_type == "Constant" or all(name in constants for name in node.input if name):
            constants.update(node.output)  # folded weights: dequantized or cast constants
        elif (
            node.op_type == "QuantizeLinear"
            and source not in buffer  # not a relabelled tensor (Flatten's): that is its own
            and all(reader.op_type == "QuantizeLinear" for reader in readers[source])
        ):
            buffer[source] = node.output[0]  # written as int8 by its producer
        elif node.op_type in ("QuantizeLinear", "DequantizeLinear", *RELABELLING) or (
            node.op_type in IN_PLACE and len(readers[source]) == 1
        ):
            buffer[node.output[0]] = source
        else:
            steps.append(node)

    sizes = tensor_bytes(graph)
    numbers: dict[str, int] = {}
    reduced = Graph()

    def number(name: str) -> int:
        name = holder(name)
        if name not in numbers:
            if name not in sizes:
                raise ValueError(f"shape inference left tensor {name!r} without a type and shape")
            numbers[name] = reduced.tensor(sizes[name])
        return numbers[name]

    reduced.inputs.extend(
        number(value.name) for value in graph.input if value.name not in constants
    )
    for node in steps:
        inputs = tuple(number(name) for name in node.input if name and name not in constants)
        reduced.operators.append(Operator(node.op_type, inputs, tuple(map(number, node.output))))
    reduced.outputs.extend(number(value.name) for value in graph.output)
    return reduced


def one_image(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose inputs take one image: a symbolic batch dimension set to 1,
    so that shape inference knows every tensor's size (a flip-averaged file, which runs
    the image and its mirror as a batch of two, then holds two)."""
    copied = onnx.ModelProto.FromString(model.SerializeToString())
    for value in copied.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1
    return copied


def in_order(graph: onnx.GraphProto) -> bool:
    """Whether every node follows the producers of its inputs."""
    available = {value.name for value in graph.input} | {t.name for t in graph.initializer}
    available.add("")  # an omitted optional input
    for node in graph.node:
        if not available.issuperset(node.input):
            return False
        available.update(node.output)
    return True


def tensor_bytes(graph: onnx.GraphProto) -> dict[str, int]:
    """Bytes of every tensor shape inference typed, one image per inference (a symbolic
    batch dimension counts as 1)."""
    sizes = {}
    for value in (*graph.input, *graph.value_info, *graph.output):
        tensor = value.type.tensor_type
        if tensor.elem_type not in BYTES:
            raise ValueError(f"tensor {value.name!r} has element type {tensor.elem_type}")
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in tensor.shape.dim]
        sizes[value.name] = math.prod(dims) * BYTES[tensor.elem_type]
    return sizes
