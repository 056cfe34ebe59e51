"""Training ingredients beyond the schedule (objectives/train.py's Recipe) and the
flip-averaged file (objectives/compress.py's FlipAveraged)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from conftest import SCHEDULE
from torch import nn

from compsearch.objectives.compress import FlipAveraged, export
from compsearch.objectives.data import load_dataset
from compsearch.objectives.measure import count_macs
from compsearch.objectives.train import (
    ADAMW_LEARNING_RATE_FACTOR,
    DeviceData,
    Phase,
    Recipe,
    fit,
    make_optimizer,
    weight_average,
    whiten_stem,
    zero_init_residual,
)
from compsearch.objectives.trial import train_model
from compsearch.spaces.builder import build
from compsearch.spaces.config import ArchConfig, CompressConfig, StageConfig, TrialConfig
from compsearch.spaces.layers import Residual


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0, subset=400)


def arch(stem_kernel: int = 3, stem_width: int = 8, blocks: int = 2) -> ArchConfig:
    stages = tuple(StageConfig("basic", 1, 16, 3, 1, (16,), True) for _ in range(blocks))
    return ArchConfig(1, 10, stem_width, stem_kernel, "relu", 0.01, stages)


def phase(**recipe: object) -> Phase:
    return Phase.of(SCHEDULE, 8, epochs=1, recipe=Recipe(**recipe))


def test_today_s_trainer_is_the_default_recipe():
    assert Phase.of(SCHEDULE, 8, epochs=1).recipe == Recipe()
    optimizer = make_optimizer(build(arch()), phase())
    assert isinstance(optimizer, torch.optim.SGD)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [SCHEDULE.weight_decay]


def test_no_norm_decay_spares_exactly_the_norms_and_biases():
    model = build(arch())
    optimizer = make_optimizer(model, phase(decay_norms=False))
    decayed, spared = optimizer.param_groups
    assert decayed["weight_decay"] == SCHEDULE.weight_decay and spared["weight_decay"] == 0.0
    norms_and_biases = {
        id(p)
        for m in model.modules()
        if isinstance(m, (nn.BatchNorm2d, nn.Linear))
        for name, p in m.named_parameters(recurse=False)
        if isinstance(m, nn.BatchNorm2d) or name == "bias"
    }
    assert {id(p) for p in spared["params"]} == norms_and_biases
    assert len(decayed["params"]) + len(spared["params"]) == len(list(model.parameters()))


def test_adamw_takes_its_scaled_learning_rate():
    optimizer = make_optimizer(build(arch()), phase(optimizer="adamw"))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(
        SCHEDULE.learning_rate * ADAMW_LEARNING_RATE_FACTOR
    )


def test_an_unknown_optimizer_or_average_is_refused():
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        Recipe(optimizer="lamb")
    with pytest.raises(ValueError, match="average_fraction"):
        Recipe(average_fraction=1.0)


def test_weight_average_decays_over_its_share_of_the_steps():
    model = nn.Linear(2, 1, bias=False)
    average = weight_average(model, fraction=0.5, total_steps=10)  # horizon 5: decay 0.8
    with torch.no_grad():
        model.weight.fill_(1.0)
        average.update_parameters(model)  # the first update copies
        model.weight.fill_(2.0)
        average.update_parameters(model)
    assert torch.allclose(average.module.weight, torch.full((1, 2), 0.8 * 1.0 + 0.2 * 2.0))
    assert weight_average(model, fraction=0.0, total_steps=10) is None


def test_a_phase_with_an_average_ends_on_the_averaged_weights(digits):
    on_device = DeviceData(digits, "cpu")
    plain, averaged = build(arch()), build(arch())
    averaged.load_state_dict(plain.state_dict())
    fit(plain, on_device, phase(), torch.Generator().manual_seed(0))
    fit(averaged, on_device, phase(average_fraction=0.5), torch.Generator().manual_seed(0))
    # The same steps, so any difference comes from ending on the average.
    differences = [
        (a - b).abs().max().item()
        for a, b in zip(plain.state_dict().values(), averaged.state_dict().values(), strict=True)
        if a.is_floating_point()
    ]
    assert max(differences) > 1e-4
    assert all(torch.isfinite(p).all() for p in averaged.parameters())


def test_zero_init_residual_starts_every_residual_block_as_its_shortcut():
    model = build(arch(blocks=2)).eval()
    assert zero_init_residual(model) == 2
    residuals = [m for m in model.modules() if isinstance(m, Residual)]
    assert len(residuals) == 2
    seen = []
    for block in residuals:
        last = [m for m in block.branch.modules() if isinstance(m, nn.BatchNorm2d)][-1]
        assert torch.count_nonzero(last.weight) == 0
        block.register_forward_hook(lambda block, args, out: seen.append((block, args[0], out)))
    with torch.no_grad():
        model(torch.randn(2, 1, 8, 8))
        for block, x, out in seen:
            assert torch.allclose(out, block.after(block.shortcut(x)))
    assert len(seen) == 2


@pytest.mark.parametrize("kernel, width", [(3, 4), (3, 16), (5, 8)])
def test_whitened_stem_decorrelates_the_patches_it_sees(digits, kernel, width):
    on_device = DeviceData(digits, "cpu")
    model = build(arch(stem_kernel=kernel, stem_width=width))
    conv = model.stem[0][0]
    dimension = kernel**2  # one channel
    assert whiten_stem(model, on_device, 8) == min(width, 2 * dimension)
    x = on_device.inputs(on_device.train.images, 8).float()
    with torch.no_grad():
        out = F.conv2d(x, conv.weight)  # no padding: every output sees a whole patch
    features = out.permute(0, 2, 3, 1).reshape(-1, width)[:, : min(width, dimension)]
    covariance = torch.cov(features.T)
    # Whitened: unit variance where the patches vary (digits' corners are constant, so
    # the smallest directions stay near zero), and no correlation between filters.
    off_diagonal = covariance - torch.diag(torch.diagonal(covariance))
    assert off_diagonal.abs().max() < 0.05
    assert covariance[0, 0] == pytest.approx(1.0, abs=0.05)
    if width > dimension:  # the negatives follow the directions
        assert torch.allclose(conv.weight[dimension], -conv.weight[0])


def test_train_model_applies_the_recipe_s_initializations(digits, monkeypatch):
    calls = []
    monkeypatch.setattr(
        "compsearch.objectives.trial.zero_init_residual", lambda model: calls.append("zero")
    )
    monkeypatch.setattr(
        "compsearch.objectives.trial.whiten_stem", lambda *args: calls.append("whiten")
    )
    config = TrialConfig(arch(), SCHEDULE, CompressConfig("fp32", 0.0))
    on_device = DeviceData(digits, "cpu")
    train_model(config, on_device, seed=0)
    assert calls == []
    train_model(config, on_device, seed=0, recipe=Recipe(zero_init_residual=True, whiten_stem=True))
    assert calls == ["zero", "whiten"]


def test_flip_averaged_file_averages_the_image_and_its_mirror(tmp_path):
    torch.manual_seed(0)
    model = build(arch()).eval()
    wrapped = FlipAveraged(model).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        expected = 0.5 * (model(x) + model(x.flip(3)))
        assert torch.allclose(wrapped(x), expected, atol=1e-6)
    path = export(wrapped, "fp32", 8, 1, tmp_path / "flip.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4)
    assert count_macs(wrapped, 1, 8) == 2 * count_macs(model, 1, 8)


def test_the_screen_s_ingredients_change_what_they_name():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        from recipe import INGREDIENTS
    finally:
        sys.path.pop(0)
    train, recipe = INGREDIENTS["batch256"](SCHEDULE, Recipe())
    assert (train.batch_size, train.learning_rate) == (256, 0.4)
    assert INGREDIENTS["average"](SCHEDULE, Recipe())[1].average_fraction == 0.05
    assert INGREDIENTS["no-smoothing"](SCHEDULE, Recipe())[0].label_smoothing == 0.0
    assert INGREDIENTS["lr0.2"](SCHEDULE, Recipe())[0].learning_rate == 0.2
    assert INGREDIENTS["decay1e-3"](SCHEDULE, Recipe())[0].weight_decay == 1e-3
    assert INGREDIENTS["flip"] is None  # the export's choice: no training of its own


def test_translation_share_sets_the_pixels_of_shift():
    from compsearch.objectives.train import translation_pad

    eighth = 1 / 8
    assert translation_pad(32, eighth) == 4 and translation_pad(28, eighth) == 3
    assert translation_pad(8, eighth) == 1
    assert translation_pad(32, 1 / 16) == 2 and translation_pad(8, 1 / 16) == 1
    assert translation_pad(32, 0.0) == 0
    with pytest.raises(ValueError, match="translation"):
        Recipe(translation=0.5)


def epochs_augmented(digits, monkeypatch, epochs: int, **recipe: object) -> list[tuple]:
    """(pad, order, flips by place) of each epoch `fit` trains, as `augment` saw them."""
    import compsearch.objectives.train as train

    seen: list[tuple] = []
    augment = train.augment

    def recording(images, draws, positions, pad, flip, cutout):
        if positions.start == 0:  # an epoch's first batch
            seen.append((pad, draws.order.clone(), draws.flip.clone()))
        return augment(images, draws, positions, pad, flip, cutout)

    monkeypatch.setattr(train, "augment", recording)
    fit(
        build(arch()),
        DeviceData(digits, "cpu"),
        Phase.of(SCHEDULE, 8, epochs=epochs, recipe=Recipe(**recipe)),
        torch.Generator().manual_seed(0),
    )
    return seen


def test_translation_reaches_the_augmentation(digits, monkeypatch):
    assert {pad for pad, _, _ in epochs_augmented(digits, monkeypatch, 1)} == {0}  # default
    assert {pad for pad, _, _ in epochs_augmented(digits, monkeypatch, 1, translation=0.125)} == {1}


def test_alternating_flip_flips_each_image_in_every_other_epoch(digits, monkeypatch):
    epochs = epochs_augmented(digits, monkeypatch, 4, alternating_flip=True)
    assert len(epochs) == 4
    by_image = []
    for _, order, flips in epochs:
        flipped = torch.empty_like(flips)
        flipped[order] = flips  # place -> image
        by_image.append(flipped)
    assert 0.3 < by_image[0].float().mean() < 0.7  # a random half to start
    for even, odd in zip(by_image[::2], by_image[1::2], strict=True):
        assert torch.equal(odd, ~even)
    assert torch.equal(by_image[0], by_image[2])
    # Fresh coins (today's trainer) agree with the alternation on about half the images.
    fresh = epochs_augmented(digits, monkeypatch, 2)
    flipped = torch.empty_like(fresh[1][2])
    flipped[fresh[1][1]] = fresh[1][2]
    assert 0.3 < (flipped == by_image[1]).float().mean() < 0.7
