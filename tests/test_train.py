"""The trainer: batch augmentation, FixRes phases, recalibration, distillation, seeds."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import SCHEDULE
from torch import nn

from compsearch.objectives import train as train_module
from compsearch.objectives.data import Split, load_dataset
from compsearch.objectives.teacher import (
    check_teacher,
    load_model,
    save_model,
    teacher_arch,
)
from compsearch.objectives.train import (
    DeviceData,
    Distillation,
    EpochDraws,
    Phase,
    accuracy,
    augment,
    autocast_dtype,
    distillation_loss,
    fit,
    predict,
    recalibrate_batchnorm,
    spread_sample,
)
from compsearch.objectives.trial import train_model
from compsearch.search.loop import default_schedule
from compsearch.spaces.builder import build
from compsearch.spaces.config import ArchConfig, CompressConfig, StageConfig, TrialConfig

PHASE = Phase(
    resolution=8,
    epochs=1,
    peak_learning_rate=0.1,
    warmup_fraction=0.15,
    batch_size=32,
    weight_decay=5e-4,
    label_smoothing=0.1,
)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0, subset=400)


def small_arch(width: int = 16) -> ArchConfig:
    stage = StageConfig("basic", 1, width, 3, 2, (width,), True)
    return ArchConfig(1, 10, 8, 3, "relu", 0.01, (stage,))


def trial_config(**train_changes) -> TrialConfig:
    return TrialConfig(
        small_arch(),
        dataclasses.replace(SCHEDULE, **train_changes),
        CompressConfig("fp32", 0.0),
    )


def marked_batch() -> torch.Tensor:
    """Four 1-channel 6x6 images, each with a distinct value in every pixel."""
    return (torch.arange(4 * 36, dtype=torch.int64) % 250 + 1).to(torch.uint8).view(4, 1, 6, 6)


def test_augment_translates_every_image_by_its_own_draw():
    images = marked_batch()
    draws = EpochDraws.draw(4, pad=2, side=6, cutout=0, generator=torch.Generator().manual_seed(1))
    out = augment(images, draws, slice(0, 4), pad=2, flip=False, cutout=0)
    padded = nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(4):
        dy, dx = int(draws.shift_y[i]), int(draws.shift_x[i])
        assert torch.equal(out[i], padded[i, :, dy : dy + 6, dx : dx + 6])
    assert out.dtype == torch.uint8


def test_augment_flips_exactly_the_drawn_images():
    images = marked_batch()
    draws = EpochDraws.draw(4, pad=0, side=6, cutout=0, generator=torch.Generator().manual_seed(3))
    draws = dataclasses.replace(draws, flip=torch.tensor([True, False, True, False]))
    out = augment(images, draws, slice(0, 4), pad=0, flip=True, cutout=0)
    for i, flipped in enumerate([True, False, True, False]):
        assert torch.equal(out[i], images[i].flip(2) if flipped else images[i])


def test_cutout_zeroes_one_square_clipped_at_the_border():
    images = marked_batch()  # no pixel is zero before cutout
    draws = EpochDraws.draw(4, pad=0, side=6, cutout=3, generator=torch.Generator())
    corners = torch.tensor([0, 4, -1, 2])  # inside, over the right/bottom, over the left/top
    draws = dataclasses.replace(draws, cutout_y=corners, cutout_x=corners)
    out = augment(images, draws, slice(0, 4), pad=0, flip=False, cutout=3)
    for i, corner in enumerate(corners.tolist()):
        expected = torch.zeros(6, 6, dtype=torch.bool)
        expected[max(0, corner) : corner + 3, max(0, corner) : corner + 3] = True
        assert torch.equal(out[i, 0] == 0, expected)


def test_training_lowers_the_loss_and_learns_digits(digits):
    on_device = DeviceData(digits, "cpu")
    torch.manual_seed(0)
    model = build(small_arch()).to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(0)
    first = fit(model, on_device, PHASE, generator)
    later = fit(model, on_device, dataclasses.replace(PHASE, epochs=6), generator)
    assert later < first * 0.8
    predicted = predict(model, on_device.val, on_device, 8)
    assert accuracy(predicted, on_device.val.labels) > 0.6  # chance is 0.1


def test_fixres_trains_at_the_low_then_the_test_resolution(digits):
    seen: list[int] = []
    original = DeviceData.inputs

    def recording(self, images, resolution):
        x = original(self, images, resolution)
        seen.append(x.shape[-1])
        return x

    config = trial_config(epochs=3, finetune_epochs=1, train_resolution=4, test_resolution=8)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DeviceData, "inputs", recording)
        train_model(config, DeviceData(digits, "cpu"), seed=0)
    batches = -(-len(digits.train) // config.train.batch_size)
    # Two low-resolution epochs, one fine-tune epoch, then recalibration at 8 px.
    assert seen[: 2 * batches] == [4] * (2 * batches)
    assert set(seen[2 * batches :]) == {8}
    assert len(seen) > 3 * batches


def test_pruning_stretches_the_fine_tune_by_the_share_of_parameters_it_removes():
    schedule = dataclasses.replace(SCHEDULE, epochs=12, finetune_epochs=3)

    def pruned(fraction: float) -> TrialConfig:
        return TrialConfig(small_arch(), schedule, CompressConfig("int8", fraction))

    assert (pruned(0.0).finetune_epochs, pruned(0.0).epochs) == (3, 12)
    assert (pruned(0.5).finetune_epochs, pruned(0.5).epochs) == (6, 15)
    assert (pruned(0.7).finetune_epochs, pruned(0.7).epochs) == (10, 19)  # 3 / 0.3
    assert pruned(0.9).finetune_epochs == 12  # at most MAX_FINETUNE_STRETCH times as long
    assert pruned(0.7).to_dict()["train"] == dataclasses.asdict(schedule)  # stored as given


def test_a_pruned_trial_fine_tunes_for_its_stretched_epochs(digits):
    epochs_seen: list[tuple[int, int]] = []  # (epochs of the phase, resolution)
    config = dataclasses.replace(
        trial_config(epochs=2, finetune_epochs=1, train_resolution=6, test_resolution=8),
        compress=CompressConfig("fp32", 0.5),
    )
    train_model(
        config, DeviceData(digits, "cpu"), seed=0,
        on_epoch=lambda epoch, epochs, resolution: epochs_seen.append((epochs, resolution)),
    )  # fmt: skip
    assert config.finetune_epochs == 2
    assert epochs_seen == [(1, 6), (2, 8), (2, 8)]


def test_a_seed_repeats_training_exactly_on_cpu(digits):
    on_device = DeviceData(digits, "cpu")
    config = trial_config(epochs=2, finetune_epochs=1, train_resolution=6, cutout=3)
    first, _ = train_model(config, on_device, seed=5)
    again, _ = train_model(config, on_device, seed=5)
    other, _ = train_model(config, on_device, seed=6)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    assert not all(
        torch.equal(tensor, other.state_dict()[name]) for name, tensor in first.state_dict().items()
    )


def test_recalibration_sets_batchnorm_statistics_from_clean_images(digits):
    on_device = DeviceData(digits, "cpu")
    model = nn.Sequential(nn.BatchNorm2d(1))
    model[0].running_mean.fill_(5.0)
    recalibrate_batchnorm(model, on_device, resolution=8, batch_size=100, images=300)
    x = on_device.inputs(on_device.train.images[spread_sample(300, len(on_device.train))], 8)
    assert model[0].running_mean.item() == pytest.approx(x.mean().item(), abs=1e-5)
    # Batch norm keeps the mean of the per-batch unbiased variances.
    variances = [x[s : s + 100].var().item() for s in range(0, 300, 100)]
    assert model[0].running_var.item() == pytest.approx(sum(variances) / 3, rel=1e-4)
    assert model[0].momentum == 0.1 and not model.training


def test_recalibration_sees_every_class_of_a_split_ordered_by_class(digits):
    """Image folders are read class by class: the first images of the training split are
    then all of one class, and statistics taken from them would fit that class alone."""
    labels = torch.sort(digits.train.labels).values
    # Each image a flat grey whose level is its class, so classes differ in their mean.
    images = (labels * 25).to(torch.uint8)[:, None, None, None].expand(-1, 1, 8, 8).clone()
    ordered = dataclasses.replace(digits, train=Split(images, labels))
    on_device = DeviceData(ordered, "cpu")
    model = nn.Sequential(nn.BatchNorm2d(1))
    count = len(on_device.train) // 4  # the first quarter holds only digits 0 to 2
    recalibrate_batchnorm(model, on_device, resolution=8, batch_size=64, images=count)
    everything = on_device.inputs(on_device.train.images, 8).mean().item()
    first = on_device.inputs(on_device.train.images[:count], 8).mean().item()
    estimate = model[0].running_mean.item()
    assert abs(estimate - everything) < abs(first - everything) / 4


def test_distillation_loss_is_zero_only_for_matching_outputs():
    logits = torch.randn(8, 10)
    assert distillation_loss(logits, logits, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(logits, torch.randn(8, 10), 4.0).item() > 0.01


def test_a_student_moves_towards_its_teacher(digits):
    on_device = DeviceData(digits, "cpu")
    torch.manual_seed(1)
    teacher = build(small_arch(8)).eval()  # untrained: its outputs are not the labels
    student = build(small_arch()).to(memory_format=torch.channels_last)
    x = on_device.inputs(on_device.val.images, 8)

    def gap() -> float:
        student.eval()
        with torch.no_grad():
            return distillation_loss(student(x), teacher(x), 1.0).item()

    before = gap()
    distillation = Distillation(teacher, weight=1.0, temperature=1.0, resolution=8)
    fit(
        student,
        on_device,
        dataclasses.replace(PHASE, epochs=3),
        torch.Generator(),
        None,
        distillation,
    )
    assert gap() < before / 2


def test_model_file_round_trip_and_mismatch(tmp_path, digits):
    arch = teacher_arch(1, 10)
    model = build(arch).eval()
    save_model(tmp_path / "teacher.pt", model, arch, val_accuracy=0.5)
    saved = load_model(tmp_path / "teacher.pt")
    loaded = saved.model
    assert saved.arch == arch and saved.facts["val_accuracy"] == 0.5 and saved.config is None
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(loaded(x), model(x))
    check_teacher(arch, digits, tmp_path / "teacher.pt")
    with pytest.raises(ValueError, match="3-channel images and predicts 100 classes"):
        check_teacher(teacher_arch(3, 100), digits, tmp_path / "teacher.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="cannot be read as a compsearch model"):
        load_model(tmp_path / "bad.pt")


def test_bf16_only_where_the_hardware_has_it(monkeypatch):
    assert autocast_dtype(torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert autocast_dtype(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert autocast_dtype(torch.device("cpu")) == torch.bfloat16


def test_bf16_training_learns_too(digits, monkeypatch):
    # Forced on: on CPUs without native bf16 it is slow but must still be correct.
    monkeypatch.setattr(train_module, "autocast_dtype", lambda device: torch.bfloat16)
    on_device = DeviceData(digits, "cpu")
    assert on_device.autocast == torch.bfloat16
    torch.manual_seed(0)
    model = build(small_arch()).to(memory_format=torch.channels_last)
    fit(model, on_device, dataclasses.replace(PHASE, epochs=4), torch.Generator().manual_seed(0))
    assert accuracy(predict(model, on_device.val, on_device, 8), on_device.val.labels) > 0.5


def test_default_schedule_keeps_a_quarter_for_the_fine_tune():
    schedule = default_schedule(12, 32)
    assert (schedule.epochs, schedule.finetune_epochs, schedule.test_resolution) == (12, 3, 32)
