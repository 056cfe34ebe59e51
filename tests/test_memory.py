"""Peak activation memory of a deployable file: hand-counted graphs and networks."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import sampled_configs
from onnx import TensorProto, helper, numpy_helper

from compsearch.objectives.compress import compact_names, export_fp32, to_fp16, to_int8
from compsearch.objectives.memory import peak_activation_bytes
from compsearch.spaces.blocks import ACTIVATIONS
from compsearch.spaces.builder import build
from compsearch.spaces.config import ArchConfig
from compsearch.spaces.estimate import channel_ratio, pruned_arch
from compsearch.spaces.memory import estimate_peak_bytes
from compsearch.spaces.space import SearchSpace, make_stage


def graph(
    nodes: list, channels: int = 2, out_channels: int = 2, constants: tuple = ()
) -> onnx.ModelProto:
    """Nodes over 4x4 images, a symbolic batch; "w_c_k" names a 1x1 convolution's weights
    from c to k channels."""
    weights = list(constants)
    for node in nodes:
        for name in node.input:
            if name.startswith("w_"):
                _, c, k = name.split("_")
                value = np.full((int(k), int(c), 1, 1), 0.1, np.float32)
                weights.append(numpy_helper.from_array(value, name))
    model = helper.make_model(
        helper.make_graph(
            nodes, "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, 4, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_channels, 4, 4])],
            initializer=weights,
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )  # fmt: skip
    onnx.checker.check_model(model)
    return model


def conv(source: str, target: str, c: int, k: int) -> onnx.NodeProto:
    return helper.make_node("Conv", [source, f"w_{c}_{k}"], [target])


def test_a_chain_holds_each_operators_input_and_output():
    """x (2x4x4 fp32, 128 B) -> a (256 B) -> sigmoid b (256 B) -> y (128 B): the
    sigmoid holds a and b, 512 bytes; x is freed once read."""
    nodes = [conv("x", "a", 2, 4), helper.make_node("Sigmoid", ["a"], ["b"]), conv("b", "y", 4, 2)]
    assert peak_activation_bytes(graph(nodes)) == 512


def test_a_relu_reading_alone_works_in_place():
    nodes = [conv("x", "a", 2, 4), helper.make_node("Relu", ["a"], ["b"]), conv("b", "y", 4, 2)]
    assert peak_activation_bytes(graph(nodes)) == 256 + 128
    # Read by two operators, its input must survive it.
    nodes = [
        conv("x", "a", 2, 4),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["c"]),
        conv("c", "y", 4, 2),
    ]
    assert peak_activation_bytes(graph(nodes)) == 3 * 256


def test_a_shortcut_keeps_the_block_input_alive_across_the_branch():
    """x, a, b and y are 4x4x4 fp32, 256 B each: the sigmoid holds x (for the sum), a and
    b; the sum holds x, b and y."""
    nodes = [
        conv("x", "a", 4, 4),
        helper.make_node("Sigmoid", ["a"], ["b"]),
        helper.make_node("Add", ["b", "x"], ["y"]),
    ]
    assert peak_activation_bytes(graph(nodes, 4, 4)) == 3 * 256
    without = [conv("x", "a", 4, 4), helper.make_node("Sigmoid", ["a"], ["b"]),
               helper.make_node("Add", ["b", "b"], ["y"])]  # fmt: skip
    assert peak_activation_bytes(graph(without, 4, 4)) == 2 * 256


def test_reshapes_share_their_inputs_buffer():
    nodes = [
        conv("x", "a", 2, 4),
        helper.make_node("Flatten", ["a"], ["f"]),
        helper.make_node("Reshape", ["f", "shape"], ["r"]),
        helper.make_node("Sigmoid", ["r"], ["s"]),
        conv("s", "y", 4, 2),
    ]
    shape = numpy_helper.from_array(np.array([1, 4, 4, 4]), "shape")
    assert (
        peak_activation_bytes(graph(nodes, constants=(shape,))) == 512
    )  # as the chain without them


def network(stages: tuple, activation: str = "relu") -> torch.nn.Module:
    torch.manual_seed(0)
    return build(ArchConfig(1, 4, 8, 3, activation, 0.01, stages)).eval()


RESIDUAL = (make_stage("basic", 1, 8, 8, 3, 1, 1, 1, False),)
# 1x8x8 input; stem to 8 channels; a basic block 8 -> 8 (identity shortcut), every
# activation 8x8x8 = 512 values. The second convolution of the branch holds the block's
# input, the branch's middle and its output, and so does the sum: 3 x 512 values.
RESIDUAL_PEAK_VALUES = 3 * 512
# An inverted block 8 -> 8, expansion 2 (16 channels inside), stride 1, identity
# shortcut: the depthwise convolution holds the block input (512 values), the expanded
# tensor and its output (1,024 each).
INVERTED = (make_stage("inverted", 1, 8, 8, 3, 1, 2, 1, False),)
INVERTED_PEAK_VALUES = 512 + 2 * 1024
# Two plain convolutions 8 -> 16 -> 16 at stride 1 after the stem: the second holds two
# 16x8x8 tensors.
PLAIN = (make_stage("plain", 2, 8, 16, 3, 1, 1, 1, False),)
PLAIN_PEAK_VALUES = 2 * 1024


@pytest.mark.parametrize(
    ("stages", "values"),
    [
        (RESIDUAL, RESIDUAL_PEAK_VALUES),
        (INVERTED, INVERTED_PEAK_VALUES),
        (PLAIN, PLAIN_PEAK_VALUES),
    ],
    ids=["residual", "inverted", "plain"],
)
def test_networks_peak_at_their_hand_counted_values_in_each_precision(stages, values):
    fp32 = export_fp32(network(stages), 8, 1)
    assert peak_activation_bytes(fp32) == 4 * values
    images = np.random.default_rng(0).normal(size=(32, 1, 8, 8)).astype(np.float32)
    assert peak_activation_bytes(to_int8(fp32, images)) == values
    assert peak_activation_bytes(to_fp16(fp32)) == 2 * values


MEMORY_SPACE = SearchSpace(3, 7, 12, width=(4, 32), stem_width=(4, 16))


def check_estimates_equal_measurements(count: int) -> None:
    """The first `count` sampled configs of a colour space (every block type, activation
    and option, pruned locally as sampled), each exported as `export` writes it at all
    three precisions: the estimate from the config alone equals the peak measured on
    each file."""
    calibration = np.random.default_rng(0).random((16, 3, 12, 12), dtype=np.float32)
    configs = sampled_configs(MEMORY_SPACE, count, seed=5)
    assert {c.arch.activation for c in configs} == set(ACTIVATIONS)
    assert {s.block for c in configs for s in c.arch.stages} == set(MEMORY_SPACE.blocks)
    assert {bool(s.squeeze_widths) for c in configs for s in c.arch.stages} == {False, True}
    for index, config in enumerate(configs):
        arch = pruned_arch(config.arch, channel_ratio(config.arch, config.compress.prune_fraction))
        torch.manual_seed(index)
        fp32 = export_fp32(build(arch), 12, 3)
        files = {"fp32": fp32, "fp16": to_fp16(fp32), "int8": to_int8(fp32, calibration)}
        for precision, file in files.items():
            measured = peak_activation_bytes(compact_names(file))
            assert estimate_peak_bytes(arch, 12, precision) == measured, (index, precision, arch)


def test_the_estimate_from_a_config_equals_the_measurement_of_its_file():
    """25 configs, 75 files: already every block type, activation and option."""
    check_estimates_equal_measurements(25)


@pytest.mark.slow
def test_the_estimate_equals_the_measurement_for_a_hundred_configs():
    """The same draw continued to 100 configs, 300 files."""
    check_estimates_equal_measurements(100)
