"""Peak activation memory of one inference: the schedule both the estimate from a config
and the measurement of an ONNX file (objectives/memory.py) count it by.

A microcontroller runtime (TensorFlow Lite Micro) runs the operators one after another
and keeps every tensor that is still to be read in its arena; the largest sum of tensors
alive at once is the RAM it needs beside the weights, which stay in flash. Both figures
reduce the network to the operators that write a new tensor (a ReLU fused into the
operator before it, a reshape or a quantize-dequantize pair write none) and count:

- an operator holds its inputs and its outputs at once; a tensor lives from the
  operator that writes it (the graph's input: from the start) to the last one that
  reads it (the graph's output: to the end), so a residual block's shortcut holds the
  block's input across the branch;
- operators run level by level: each level is the operators whose inputs the earlier
  levels wrote, in the order the graph lists them (compsearch writes its files in that
  order, and a converter's own order would be another schedule);
- each tensor at the precision a runtime holds it in: 1 byte per value in an int8
  file (onnxruntime's quantizer leaves no activation in float), 2 in fp16 (the input is
  cast from fp32 and the output back), 4 in fp32.

An int8 `.tflite` file (objectives/tflite.py) runs the same operators with two more: a
transpose of the input from NCHW to the NHWC its kernels take; hardswish as one
operator (HARD_SWISH) rather than two; and, before a strided
convolution whose padding TensorFlow's SAME padding cannot express (a 3x3 at stride 2 on
an even side: torch pads one pixel on each side, SAME none before and one after), an
explicit PAD writing the padded input.

`peak_bytes` is the count; `estimate_peak_bytes` builds the reduced graph from a config,
as the ONNX export and onnxruntime's quantizer write it, without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from compsearch.spaces.blocks import get_block, out_resolution
from compsearch.spaces.config import ArchConfig, block_shapes

VALUE_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}


@dataclass(frozen=True)
class Operator:
    kind: str  # the ONNX operator type
    inputs: tuple[int, ...]  # tensor numbers, activations only (no weights)
    outputs: tuple[int, ...]


@dataclass
class Graph:
    """Operators over numbered tensors of known bytes, one image per inference."""

    sizes: list[int] = field(default_factory=list)  # bytes of each tensor by number
    operators: list[Operator] = field(default_factory=list)
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)

    def tensor(self, size: int) -> int:
        self.sizes.append(size)
        return len(self.sizes) - 1

    def add(self, kind: str, inputs: tuple[int, ...], size: int) -> int:
        """An operator writing one new tensor of `size` bytes; returns its number."""
        output = self.tensor(size)
        self.operators.append(Operator(kind, inputs, (output,)))
        return output


def schedule(graph: Graph) -> list[Operator]:
    """The operators level by level: the first level reads only the graph's inputs, each
    next one what the levels before it wrote; within a level, the graph's order."""
    level = dict.fromkeys(graph.inputs, 0)
    levels = []
    for operator in graph.operators:  # the graph lists each operator after its inputs
        depth = 1 + max((level.get(name, 0) for name in operator.inputs), default=0)
        level.update(dict.fromkeys(operator.outputs, depth))
        levels.append(depth)
    order = sorted(range(len(graph.operators)), key=lambda index: levels[index])
    return [graph.operators[index] for index in order]


def peak_bytes(graph: Graph) -> int:
    """The largest sum of bytes of tensors alive at once, run as `schedule` orders it."""
    steps = schedule(graph)
    end = len(steps)
    born = dict.fromkeys(graph.inputs, -1)
    last = dict.fromkeys(graph.outputs, end)
    for step, operator in enumerate(steps):
        for name in operator.outputs:
            born.setdefault(name, step)
        for name in operator.inputs:
            last[name] = max(last.get(name, step), step)
    peak = 0
    for step in range(end):
        alive = (name for name, start in born.items() if start <= step <= last.get(name, start))
        peak = max(peak, sum(graph.sizes[name] for name in alive))
    return peak


class Tracer:
    """Builds the reduced graph of a network, block by block, at one precision: what
    `Block.trace` calls. Every tensor is `channels` x `side` x `side` values."""

    def __init__(self, precision: str, activation: str, file_format: str = "onnx") -> None:
        if precision not in VALUE_BYTES:
            raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(VALUE_BYTES)}")
        self.file_format = file_format
        self.graph = Graph()
        self.precision = precision
        self.activation_name = activation
        self.value_bytes = VALUE_BYTES[precision]

    def size(self, channels: int, side: int) -> int:
        return channels * side * side * self.value_bytes

    def conv(
        self,
        x: int,
        channels: int,
        side: int,
        kernel: int = 1,
        stride: int = 1,
        in_channels: int = 0,
        in_side: int = 0,
    ) -> int:
        """A convolution (its batch norm folded in) writing `channels` x `side` x `side`;
        where it strides, from `in_channels` x `in_side` x `in_side` by a `kernel`-wide
        window, which a .tflite file may pad first (`explicit_padding`)."""
        if self.file_format == "tflite" and explicit_padding(in_side, kernel, stride):
            padded = in_side + 2 * (kernel // 2)
            x = self.graph.add("Pad", (x,), self.size(in_channels, padded))
        return self.graph.add("Conv", (x,), self.size(channels, side))

    def activation(self, x: int, channels: int, side: int) -> int:
        """The network's activation on `x`. A ReLU writes nothing: the int8 quantizer
        drops it (the range of the output clips it), and elsewhere it works in place on
        its only reader's input."""
        size = self.size(channels, side)
        name = self.activation_name
        if name == "relu":
            return x
        if name == "leaky_relu":
            return self.graph.add("LeakyRelu", (x,), size)
        if name == "silu":  # exported as x * sigmoid(x)
            return self.graph.add("Mul", (x, self.graph.add("Sigmoid", (x,), size)), size)
        if name == "hardswish":
            # onnxruntime's quantizer spells it x * hardsigmoid(x); LiteRT has HARD_SWISH.
            if self.precision == "int8" and self.file_format == "onnx":
                gate = self.graph.add("HardSigmoid", (x,), size)
                return self.graph.add("Mul", (x, gate), size)
            return self.graph.add("HardSwish", (x,), size)
        raise ValueError(f"unknown activation {name!r}")

    def sum(self, a: int, b: int, channels: int, side: int) -> int:
        return self.graph.add("Add", (a, b), self.size(channels, side))

    def squeeze_excite(self, x: int, channels: int, squeeze_width: int, side: int) -> int:
        """x * sigmoid(expand(activation(reduce(pool(x))))); nothing without a width."""
        if not squeeze_width:
            return x
        pooled = self.graph.add("GlobalAveragePool", (x,), self.size(channels, 1))
        reduced = self.activation(self.conv(pooled, squeeze_width, 1), squeeze_width, 1)
        expanded = self.conv(reduced, channels, 1)
        gate = self.graph.add("Sigmoid", (expanded,), self.size(channels, 1))
        return self.graph.add("Mul", (x, gate), self.size(channels, side))


def explicit_padding(in_side: int, kernel: int, stride: int) -> bool:
    """Whether a convolution padded by kernel // 2 on every side (spaces/layers.py) pads
    otherwise than TensorFlow's SAME padding, so that its .tflite file writes the padded
    input with a PAD operator first. SAME pads `total` pixels, half (rounded down)
    before; 0 for `in_side` not known."""
    if not in_side:
        return False
    out = -(-in_side // stride)
    total = max((out - 1) * stride + kernel - in_side, 0)
    return (total // 2, total - total // 2) != (kernel // 2, kernel // 2)


def trace(arch: ArchConfig, resolution: int, precision: str, file_format: str = "onnx") -> Graph:
    """The reduced graph of `arch`'s deployable file (ONNX at `precision`, or an int8
    .tflite) for `resolution` x `resolution` inputs, in the order the file lists its
    operators."""
    tracer = Tracer(precision, arch.activation, file_format)
    graph = tracer.graph
    if precision == "fp16":  # a float32 input, cast to fp16
        source = graph.tensor(arch.in_channels * resolution * resolution * 4)
        x = graph.add("Cast", (source,), tracer.size(arch.in_channels, resolution))
    else:
        source = x = graph.tensor(tracer.size(arch.in_channels, resolution))
    if file_format == "tflite":  # NCHW to NHWC
        x = graph.add("Transpose", (source,), tracer.size(arch.in_channels, resolution))
    graph.inputs.append(source)
    x = tracer.activation(tracer.conv(x, arch.stem_width, resolution), arch.stem_width, resolution)
    side = resolution
    for stage, shape in block_shapes(arch):
        x = get_block(stage.block).trace(tracer, x, shape, side)
        side = out_resolution(side, shape.stride)
    pooled = graph.add("GlobalAveragePool", (x,), tracer.size(arch.final_width, 1))
    y = graph.add("Gemm", (pooled,), tracer.size(arch.num_classes, 1))  # Flatten: a relabel
    if precision == "fp16":  # cast back to float32
        y = graph.add("Cast", (y,), arch.num_classes * 4)
    graph.outputs.append(y)
    return graph


def estimate_peak_bytes(
    arch: ArchConfig, resolution: int, precision: str, file_format: str = "onnx"
) -> int:
    """Peak activation bytes of `arch`'s deployable file at `precision` (in
    `file_format`), from its shapes."""
    return peak_bytes(trace(arch, resolution, precision, file_format))
