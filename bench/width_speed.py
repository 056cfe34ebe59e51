"""Training images per second of ResNet-8 shapes whose widths are or are not multiples of
8: what the widths pruning leaves cost on this CPU. One bf16 (where the CPU multiplies in
bf16) training step at 32 px, batch 256, channels_last, repeated on one fixed batch.

    python bench/width_speed.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from cifar10_300kb import machine  # bench/, beside this script

from compsearch.objectives.teacher import residual_arch
from compsearch.objectives.train import autocast_dtype
from compsearch.spaces.builder import build

WIDTHS = [(16, 32, 64), (11, 22, 45), (12, 24, 44), (16, 24, 48), (8, 16, 32)]


def main() -> None:
    print(machine())
    dtype = autocast_dtype(torch.device("cpu"))
    x = torch.randn(256, 3, 32, 32).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (256,))
    for widths in WIDTHS:
        torch.manual_seed(0)
        model = build(residual_arch(3, 10, widths, 1)).to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model=model, optimizer=optimizer) -> None:
            with torch.autocast("cpu", dtype or torch.bfloat16, enabled=dtype is not None):
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        for _ in range(3):
            step()
        tick = time.perf_counter()
        for _ in range(10):
            step()
        rate = 256 * 10 / (time.perf_counter() - tick)
        params = sum(p.numel() for p in model.parameters())
        print(f"{widths}: {params:,} params, {rate:,.0f} images/s")


if __name__ == "__main__":
    main()
