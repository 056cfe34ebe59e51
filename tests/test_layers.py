"""The strided 1x1 convolution that trains around a oneDNN fault on the CPU."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch
from torch import nn

from compsearch.spaces.layers import StridedPointwise, conv_bn


def test_a_strided_projection_of_few_channels_trains_on_the_cpu():
    """Pruning leaves projections of 2 input channels; their training step must finish.
    With one thread the fault crashes at once rather than hanging, so it runs alone."""
    program = textwrap.dedent(
        """
        import torch
        from compsearch.spaces.layers import conv_bn
        torch.set_num_threads(1)
        torch.manual_seed(0)
        for in_width in (1, 2, 3, 5, 7):
            layer = conv_bn(in_width, 16, 1, 2).to(memory_format=torch.channels_last).train()
            x = torch.randn(64, in_width, 32, 32).to(memory_format=torch.channels_last)
            for _ in range(3):
                layer(x.requires_grad_()).sum().backward()
        print("trained")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "trained"


def test_a_strided_projection_takes_gradients_in_eval_mode_as_taylor_pruning_does():
    """Taylor pruning takes gradients with the model in eval mode. On AVX-512 oneDNN's
    kernel writes past its workspace below 16 input channels: with the plain strided
    convolution this program segfaults on the first shape (2-core Intel Xeon, AVX-512)."""
    program = textwrap.dedent(
        """
        import torch
        from compsearch.spaces.layers import conv_bn
        torch.set_num_threads(1)
        torch.manual_seed(0)
        for in_width in (15, 12, 8, 4, 1):
            for mode in ("eval", "train"):
                layer = conv_bn(in_width, 16, 1, 2).to(memory_format=torch.channels_last)
                getattr(layer, mode)()
                x = torch.randn(32, in_width, 64, 64).to(memory_format=torch.channels_last)
                for _ in range(3):
                    layer(x.requires_grad_()).sum().backward()
        print("took gradients")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.strip() == "took gradients"


def test_without_gradients_and_in_the_exported_file_it_is_the_plain_strided_convolution(
    tmp_path,
):
    import onnx

    from compsearch.objectives.compress import export_fp32

    layer = nn.Sequential(StridedPointwise(3, 8, 1, stride=2)).eval()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    assert "SliceBackward0" in backward_ops(layer(x))  # the detour, in eval mode too
    with torch.no_grad():
        assert layer(x).grad_fn is None
    graph = export_fp32(layer, 8, 3).graph
    assert [node.op_type for node in graph.node] == ["Conv"]
    (strides,) = [a for a in graph.node[0].attribute if a.name == "strides"]
    assert list(onnx.helper.get_attribute_value(strides)) == [2, 2]


def backward_ops(output: torch.Tensor) -> set[str]:
    """The names of the autograd nodes that produced `output`."""
    names, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_the_strided_pointwise_convolution_computes_what_the_plain_one_does():
    torch.manual_seed(0)
    ours = StridedPointwise(3, 8, 1, stride=2, bias=True).train()
    plain = nn.Conv2d(3, 8, 1, stride=2, bias=True)
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(4, 3, 9, 9)  # odd: the subsampled side must round up as the stride does
    ours(x.to(memory_format=torch.channels_last)).square().sum().backward()
    plain(x).square().sum().backward()  # NCHW: not the faulty kernel
    assert torch.allclose(ours.weight.grad, plain.weight.grad, atol=1e-5)
    assert torch.allclose(ours.bias.grad, plain.bias.grad, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(ours(x), plain(x), atol=1e-6)
    assert ours.eval()(x).shape == (4, 8, 5, 5)


def test_only_strided_pointwise_convolutions_take_the_detour():
    assert type(conv_bn(4, 8, 1, 2)[0]) is StridedPointwise
    assert type(conv_bn(4, 8, 1, 1)[0]) is nn.Conv2d
    assert type(conv_bn(4, 8, 3, 2)[0]) is nn.Conv2d
