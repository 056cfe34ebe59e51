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
