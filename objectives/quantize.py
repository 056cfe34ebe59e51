"""Quantization-aware fine-tuning: let the network learn the rounding int8 will apply.

Post-training int8 (`compress.to_int8`) rounds each convolution's weights to 2 x
WEIGHT_LEVELS + 1 levels per output channel and the activations entering it to 256
levels. When that costs accuracy, a short fine-tune with the same rounding in the
forward pass (gradients pass straight through it, Bengio et al., 2013) lets the weights
settle where rounding hurts least. It trains a copy whose batch norms are folded into
the convolutions, as the ONNX export folds them, so the weights rounded here are the
weights the file stores; the result is written back into the original modules (each
batch norm becomes the identity plus the folded bias), so the model still rebuilds from
its config and state dict.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from compsearch.objectives.compress import WEIGHT_LEVELS  # symmetric: max |w| / levels
from compsearch.objectives.train import DeviceData, Phase, TrainingDiverged, fit

ACTIVATION_LEVELS = 255  # asymmetric uint8 activations over [min(0, low), max(0, high)]
RANGE_MOMENTUM = 0.01  # weight of each training batch in the activation range average


class RoundWeights(nn.Module):
    """Per-output-channel symmetric int8 rounding of a weight times `scale` (a
    parametrization): with a batch norm's scale, the folded weight the file stores."""

    def __init__(self, scale: torch.Tensor | None = None) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            weight = weight * self.scale.reshape(-1, *([1] * (weight.dim() - 1)))
        dims = tuple(range(1, weight.dim()))
        scale = weight.detach().abs().amax(dim=dims).clamp_min(1e-12) / WEIGHT_LEVELS
        zero = torch.zeros(len(scale), dtype=torch.int32, device=weight.device)
        return torch.fake_quantize_per_channel_affine(
            weight, scale.float(), zero, 0, -WEIGHT_LEVELS, WEIGHT_LEVELS
        )


class RoundActivations:
    """A forward pre-hook that rounds a layer's input to uint8 over a running range."""

    def __init__(self) -> None:
        self.low: torch.Tensor | None = None
        self.high: torch.Tensor | None = None

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple:
        x = inputs[0]
        with torch.no_grad():
            low, high = x.min().clamp(max=0), x.max().clamp(min=0)
            if self.low is None or self.high is None:
                self.low, self.high = low, high
            elif module.training:
                self.low = self.low + RANGE_MOMENTUM * (low - self.low)
                self.high = self.high + RANGE_MOMENTUM * (high - self.high)
            span = float((self.high - self.low).clamp_min(1e-8))
            if not math.isfinite(span):  # a NaN or infinite input reached the range
                raise TrainingDiverged(
                    f"a layer's input range became {span} in the quantization-aware fine-tune"
                )
            scale = span / ACTIVATION_LEVELS
            zero_point = int(round(float(-self.low) / scale))
        rounded = torch.fake_quantize_per_tensor_affine(
            x.float(), scale, zero_point, 0, ACTIVATION_LEVELS
        )
        return (rounded.to(x.dtype), *inputs[1:])


@torch.no_grad()
def check_outputs_finite(model: nn.Module, data: DeviceData, phase: Phase) -> None:
    """Raise TrainingDiverged when `model` answers a batch of training images with a
    non-finite logit. The loss that training checks is computed before each step, so a
    last step that blows the weights up (a fine-tune of two steps did) goes unseen."""
    images = data.train.images[: phase.batch_size]
    logits = model.eval()(data.inputs(images, phase.resolution))
    if not torch.isfinite(logits).all():
        raise TrainingDiverged("the quantization-aware fine-tune left non-finite outputs")


def conv_norm_pairs(model: nn.Module) -> dict[str, nn.Sequential]:
    """Every convolution followed by its batch norm (the builder's `conv_bn`), by name."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Sequential)
        and len(module) == 2
        and isinstance(module[0], nn.Conv2d)
        and isinstance(module[1], nn.BatchNorm2d)
    }


@torch.no_grad()
def fold_batchnorms(model: nn.Module) -> nn.Module:
    """A copy of `model` (eval-mode statistics) with every batch norm folded into the
    convolution before it, which gains a bias; the norm becomes nn.Identity."""
    folded, scales = fold_shifts(model)
    for conv, scale in scales.items():
        conv.weight.mul_(scale.reshape(-1, *([1] * (conv.weight.dim() - 1))))
    return folded


@torch.no_grad()
def fold_shifts(model: nn.Module) -> tuple[nn.Module, dict[nn.Conv2d, torch.Tensor]]:
    """A copy of `model` (eval-mode statistics) whose batch norms are nn.Identity, each
    norm's shift folded into the convolution's bias, and the per-output-channel scale
    that each such convolution's weight is still to be multiplied by."""
    folded = copy.deepcopy(model)
    scales = {}
    for pair in conv_norm_pairs(folded).values():
        conv, norm = pair[0], pair[1]
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        bias = norm.bias - norm.running_mean * scale
        if conv.bias is not None:
            bias = bias + conv.bias * scale
        conv.bias = nn.Parameter(bias)
        scales[conv] = scale.detach().clone()
        pair[1] = nn.Identity()
    return folded, scales


@torch.no_grad()
def unfold_into(model: nn.Module, folded: nn.Module) -> None:
    """Load `folded`'s weights into `model`, whose batch norms become the identity plus
    the folded bias: `model` then computes what `folded` computes, and its ONNX export
    (which folds the norms again) holds `folded`'s weights."""
    weights = folded.state_dict()
    state = model.state_dict()
    for key in state.keys() & weights.keys():
        state[key] = weights[key]
    for name, pair in conv_norm_pairs(model).items():
        norm = pair[1]
        conv_key, norm_key = f"{name}.0", f"{name}.1"
        state[f"{norm_key}.bias"] = weights[f"{conv_key}.bias"]
        if pair[0].bias is not None:
            state[f"{conv_key}.bias"] = torch.zeros_like(state[f"{conv_key}.bias"])
        state[f"{norm_key}.running_mean"] = torch.zeros_like(norm.running_mean)
        state[f"{norm_key}.running_var"] = torch.ones_like(norm.running_var)
        # Scale exactly 1: the weight equals the square root the norm divides by.
        state[f"{norm_key}.weight"] = torch.sqrt(torch.ones_like(norm.weight) + norm.eps)
    model.load_state_dict(state)


def _rounded_layer(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d | nn.Linear)


def quantization_aware_finetune(
    model: nn.Module, data: DeviceData, phase: Phase, generator: torch.Generator
) -> nn.Module:
    """A copy of `model` fine-tuned for `phase` with int8 rounding of every convolution's
    and linear layer's weights and inputs, written back into `model`'s structure.

    Trains in fp32 whatever the device's autocast: the rounding is the point. The weights
    trained are those the batch norms scale, as in training (the scales fixed, from the
    norms' statistics): the folded weights the file stores are computed from them. SGD
    on the folded weights themselves moves each channel as if its learning rate were
    divided by its scale squared, and a ResNet-8 on CIFAR-10 diverged so.
    """
    folded, scales = fold_shifts(model)
    layers = [m for m in folded.modules() if _rounded_layer(m)]
    hooks = [layer.register_forward_pre_hook(RoundActivations()) for layer in layers]
    for layer in layers:
        parametrize.register_parametrization(layer, "weight", RoundWeights(scales.get(layer)))
    full_precision = copy.copy(data)
    full_precision.autocast = None
    try:
        fit(folded, full_precision, phase, generator)
    finally:
        for hook in hooks:
            hook.remove()
    check_outputs_finite(folded, full_precision, phase)
    for layer in layers:
        # Keep the rounded weights: onnxruntime then finds the same maxima and scales and
        # rounds them to the same integers.
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    trained = copy.deepcopy(model)
    unfold_into(trained, folded)
    return trained.eval()
