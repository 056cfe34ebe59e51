"""Pruning to a share of parameters by each criterion, quantization-aware fine-tuning, and
what a trial records about compression."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import SCHEDULE
from onnx import numpy_helper

from compsearch.objectives import trial as trial_module
from compsearch.objectives.compress import export, prune
from compsearch.objectives.data import load_dataset
from compsearch.objectives.measure import calibration_images, count_params
from compsearch.objectives.quantize import (
    RoundActivations,
    fold_batchnorms,
    quantization_aware_finetune,
)
from compsearch.objectives.train import DeviceData, Phase, TrainingDiverged, fit
from compsearch.objectives.trial import finetune_phase, run_trial, taylor_loss
from compsearch.spaces.budgets import Budgets
from compsearch.spaces.builder import build
from compsearch.spaces.config import ArchConfig, CompressConfig, StageConfig, TrialConfig


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0, subset=600)


def arch() -> ArchConfig:
    return ArchConfig(
        1,
        10,
        16,
        3,
        "relu",
        0.01,
        (
            StageConfig("basic", 1, 24, 3, 1, (24,), True),
            StageConfig("inverted", 2, 32, 3, 2, (96, 128), True, squeeze_widths=(24, 8)),
        ),
    )


@pytest.fixture(scope="module")
def trained(digits):
    on_device = DeviceData(digits, "cpu")
    torch.manual_seed(0)
    model = build(arch())
    phase = Phase.of(SCHEDULE, 8, 3)
    fit(model, on_device, phase, torch.Generator().manual_seed(0))
    return model.eval(), on_device


@pytest.mark.parametrize("criterion", ["l2", "bn_scale", "taylor"])
@pytest.mark.parametrize("scope", ["local", "global"])
def test_each_criterion_removes_the_share_of_parameters_asked(trained, criterion, scope):
    model, on_device = trained
    model = copy.deepcopy(model)
    before = count_params(model)
    compress = CompressConfig("fp32", 0.4, criterion, scope)
    pruned = prune(model, arch(), compress, torch.zeros(1, 1, 8, 8), taylor_loss(on_device, 8))
    assert 0.4 * before <= before - count_params(model) <= 0.55 * before
    rebuilt = build(pruned).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = on_device.inputs(on_device.val.images[:16], 8)
    torch.testing.assert_close(rebuilt(x), model.eval()(x))


def opposed_stem(model: torch.nn.Module) -> torch.nn.Module:
    """A copy whose stem filters' norms rank opposite to their batch-norm scales (the
    largest filter has the smallest scale), so that the criteria cannot agree by chance
    on which stem channels matter."""
    copied = copy.deepcopy(model)
    conv, norm = copied.stem[0][0], copied.stem[0][1]
    rank = torch.arange(1, conv.out_channels + 1, dtype=torch.float32)
    with torch.no_grad():
        norms = conv.weight.flatten(1).norm(dim=1)
        conv.weight.mul_((10 * rank / norms).view(-1, 1, 1, 1))  # norms 10, 20, ...
        norm.weight.copy_(1 / rank)  # scales 1, 1/2, ...
    return copied


def test_criteria_choose_different_channels(trained):
    """The criterion decides which channels go, not only how many."""
    model, on_device = trained
    model = opposed_stem(model)
    kept = {}
    for criterion in ("l2", "bn_scale", "taylor"):
        copied = copy.deepcopy(model)
        compress = CompressConfig("fp32", 0.4, criterion, "local")
        prune(copied, arch(), compress, torch.zeros(1, 1, 8, 8), taylor_loss(on_device, 8))
        kept[criterion] = copied.stem[0][0].weight.detach().clone()
    assert kept["l2"].shape == kept["bn_scale"].shape == kept["taylor"].shape
    assert not torch.equal(kept["l2"], kept["bn_scale"])
    assert not torch.equal(kept["l2"], kept["taylor"])


def test_global_pruning_shrinks_layers_unequally(trained):
    model, on_device = trained
    shares = {}
    for scope in ("local", "global"):
        copied = copy.deepcopy(model)
        pruned = prune(
            copied, arch(), CompressConfig("fp32", 0.5, "l2", scope), torch.zeros(1, 1, 8, 8)
        )
        widths = [pruned.stem_width] + [s.width for s in pruned.stages]
        shares[scope] = [round(w / o, 2) for w, o in zip(widths, (16, 24, 32), strict=True)]
    assert len(set(shares["local"])) <= 2  # the same ratio everywhere, up to rounding
    assert max(shares["global"]) - min(shares["global"]) > max(shares["local"]) - min(
        shares["local"]
    )


def test_folding_batch_norms_keeps_the_outputs(trained):
    model, on_device = trained
    x = on_device.inputs(on_device.val.images[:32], 8)
    folded = fold_batchnorms(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)


def conv_weights(model: onnx.ModelProto) -> list[np.ndarray]:
    """Each Conv's weight as the file computes it: int8 values times their scales."""
    graph = model.graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    weights = []
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        name = node.input[1]
        if name in constants:
            weights.append(constants[name].astype(np.float64))
            continue
        dequantize = producers[name]
        assert dequantize.op_type == "DequantizeLinear"
        values, scale = (constants[n] for n in dequantize.input[:2])
        assert values.dtype == np.int8
        shape = (-1,) + (1,) * (values.ndim - 1)
        weights.append(values.astype(np.float64) * scale.astype(np.float64).reshape(shape))
    return weights


def test_quantization_aware_weights_are_what_the_int8_file_holds(trained, digits, tmp_path):
    """The fine-tune rounds weights to the grid onnxruntime uses, so the int8 file holds
    exactly the fine-tuned weights, and the model still rebuilds from its config."""
    model, on_device = trained
    train = dataclasses.replace(SCHEDULE, finetune_epochs=1)
    tuned = quantization_aware_finetune(
        model, on_device, finetune_phase(train), torch.Generator().manual_seed(1)
    )
    assert not torch.equal(tuned.stem[0][0].weight, model.stem[0][0].weight)
    rebuilt = build(arch()).eval()
    rebuilt.load_state_dict(tuned.state_dict())
    calibration = calibration_images(digits, 8, 128, 0)
    fp32 = onnx.load(export(copy.deepcopy(tuned), "fp32", 8, 1, tmp_path / "a.onnx"))
    int8 = onnx.load(export(rebuilt, "int8", 8, 1, tmp_path / "b.onnx", calibration))
    exact, stored = conv_weights(fp32), conv_weights(int8)
    assert len(exact) == len(stored) > 5
    for a, b in zip(exact, stored, strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6 * np.abs(a).max())
    # Without the fine-tune the rounding moves the weights.
    untuned = conv_weights(onnx.load(export(model, "int8", 8, 1, tmp_path / "c.onnx", calibration)))
    plain = conv_weights(onnx.load(export(model, "fp32", 8, 1, tmp_path / "d.onnx")))
    assert max(np.abs(a - b).max() for a, b in zip(plain, untuned, strict=True)) > 1e-4


@pytest.mark.parametrize(("epochs", "fine_tune_epochs"), [(2, 1), (12, 1), (25, 2), (40, 3)])
def test_the_quantization_aware_fine_tune_sees_a_share_of_the_images_training_saw(
    trained, monkeypatch, epochs, fine_tune_epochs
):
    """A sixteenth of epochs x training images, in whole epochs over distinct images:
    after 2 epochs, one epoch over an eighth of them; after 25, 2 epochs over 25/32."""
    model, on_device = trained
    training = len(on_device.train)
    seen = []

    def spy(model, data, phase, generator):
        seen.append((data.train.images, phase.epochs))
        return model

    monkeypatch.setattr(trial_module, "quantization_aware_finetune", spy)
    train = dataclasses.replace(SCHEDULE, epochs=epochs)
    trial_module.quantization_aware_copy(model, on_device, train, seed=0)
    ((images, phase_epochs),) = seen
    assert phase_epochs == fine_tune_epochs
    assert abs(len(images) * phase_epochs - training * epochs / 16) <= phase_epochs
    distinct = {tuple(image.flatten().tolist()) for image in images}
    assert len(distinct) > 0.95 * len(images)  # a draw of different images


def test_a_trial_records_accuracy_before_and_after_compression(digits, tmp_path, monkeypatch):
    """With the threshold below any loss, a quantization-aware copy is always tried; the
    file kept is the more accurate of the two, and the accuracies say so."""
    monkeypatch.setattr(trial_module, "QUANTIZATION_AWARE_THRESHOLD", -1.0)
    config = TrialConfig(arch(), SCHEDULE, CompressConfig("int8", 0.3, "taylor", "global"))
    result = run_trial(config, digits, tmp_path, seed=0)
    assert 0 < result.accuracy_before_compression <= 1
    assert result.accuracy >= result.accuracy_post_training
    assert result.quantization_aware == (result.accuracy > result.accuracy_post_training)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    assert result.params == count_params(build(result.config.arch))


def test_rounding_a_non_finite_input_says_the_fine_tune_diverged():
    hook = RoundActivations()
    layer = torch.nn.Conv2d(1, 1, 1)
    hook(layer, (torch.ones(1, 1, 2, 2),))  # a finite range first
    with pytest.raises(TrainingDiverged, match="quantization-aware"):
        hook(layer, (torch.full((1, 1, 2, 2), float("nan")),))


def test_a_diverging_quantization_aware_fine_tune_keeps_the_post_training_file(
    digits, tmp_path, monkeypatch
):
    """A fine-tune whose learning rate blows it up (as one did without batch norms on a
    CIFAR-10 ResNet-8) leaves the trial with its post-training int8 file, not a crash."""
    monkeypatch.setattr(trial_module, "QUANTIZATION_AWARE_THRESHOLD", -1.0)
    monkeypatch.setattr(trial_module, "QUANTIZATION_AWARE_LEARNING_RATE_FACTOR", 1e6)
    config = TrialConfig(arch(), SCHEDULE, CompressConfig("int8", 0.0, "l2", "local"))
    on_device = DeviceData(digits, "cpu")
    torch.manual_seed(0)
    model = build(config.arch)
    fit(model, on_device, Phase.of(SCHEDULE, 8, 1), torch.Generator().manual_seed(0))
    with pytest.raises(TrainingDiverged):  # the fine-tune does diverge at this rate
        quantization_aware_finetune(
            model, on_device, finetune_phase(SCHEDULE, 1e6), torch.Generator().manual_seed(1)
        )
    result = run_trial(config, digits, tmp_path, seed=0)
    assert not result.quantization_aware
    assert result.accuracy == result.accuracy_post_training > 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


# Accuracies as a validation split of this many images gives them: correct / IMAGES.
IMAGES = 1000
FP32_CORRECT = 900


class Measured:
    """Stands in for onnx_accuracy: the accuracies it was made with, in order, and the
    bytes of each file it was asked to measure."""

    def __init__(self, *correct: int) -> None:
        self.accuracies = [count / IMAGES for count in correct]
        self.files: list[bytes] = []

    def __call__(self, path, split, data, resolution) -> float:
        self.files.append(path.read_bytes())
        count = len(self.files)
        assert count <= len(self.accuracies), (
            f"file {count} measured, {len(self.accuracies)} expected"
        )
        return self.accuracies[count - 1]


class FineTuneSpy:
    """quantization_aware_finetune as it is, remembering each model it returned."""

    def __init__(self) -> None:
        self.returned: list[torch.nn.Module] = []

    def __call__(self, *args, **kwargs) -> torch.nn.Module:
        tuned = quantization_aware_finetune(*args, **kwargs)
        self.returned.append(tuned)
        return tuned


def deploy_int8(trained, digits, folder, monkeypatch, *correct: int):
    """Deploy the trained model as int8 while the files measure `correct` images out of
    IMAGES in turn, against FP32_CORRECT for the fp32 model."""
    model, on_device = trained
    measured, spy = Measured(*correct), FineTuneSpy()
    monkeypatch.setattr(trial_module, "onnx_accuracy", measured)
    monkeypatch.setattr(trial_module, "quantization_aware_finetune", spy)
    config = TrialConfig(arch(), SCHEDULE, CompressConfig("int8", 0.0, "l2", "local"))
    deployed = trial_module.deploy(
        model, config, digits, on_device, folder / "model.onnx", digits.val, 0,
        FP32_CORRECT / IMAGES,
    )  # fmt: skip
    return deployed, measured, spy


def test_a_loss_over_the_threshold_fine_tunes_and_keeps_the_better_file(
    trained, digits, tmp_path, monkeypatch
):
    """Post-training int8 loses 4 images in 1000 (0.4 points > 0.3): the fine-tune runs,
    and its file, measuring 3 images better, replaces the post-training one."""
    lost = FP32_CORRECT - 4
    deployed, measured, spy = deploy_int8(trained, digits, tmp_path, monkeypatch, lost, lost + 3)
    assert len(spy.returned) == 1 and len(measured.files) == 2
    assert measured.files[0] != measured.files[1]  # the tuned copy wrote its own file
    assert deployed.quantization_aware
    assert deployed.model is spy.returned[0]
    assert deployed.accuracy == (lost + 3) / IMAGES
    assert deployed.accuracy_post_training == lost / IMAGES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    assert deployed.path.read_bytes() == measured.files[1]


def test_a_fine_tuned_file_no_better_is_dropped(trained, digits, tmp_path, monkeypatch):
    lost = FP32_CORRECT - 4
    deployed, measured, spy = deploy_int8(trained, digits, tmp_path, monkeypatch, lost, lost)
    assert len(spy.returned) == 1 and len(measured.files) == 2
    assert not deployed.quantization_aware
    assert deployed.model is trained[0]
    assert deployed.accuracy == deployed.accuracy_post_training == lost / IMAGES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    assert deployed.path.read_bytes() == measured.files[0]


@pytest.mark.parametrize("images_lost", [3, 1, 0, -2])  # 3 in 1000: exactly the threshold
def test_a_loss_at_or_below_the_threshold_keeps_the_post_training_file(
    trained, digits, tmp_path, monkeypatch, images_lost
):
    assert images_lost / IMAGES <= trial_module.QUANTIZATION_AWARE_THRESHOLD
    correct = FP32_CORRECT - images_lost
    deployed, measured, spy = deploy_int8(trained, digits, tmp_path, monkeypatch, correct)
    assert spy.returned == [] and len(measured.files) == 1
    assert not deployed.quantization_aware
    assert deployed.accuracy == deployed.accuracy_post_training == correct / IMAGES
    assert deployed.path.read_bytes() == measured.files[0]


@pytest.mark.parametrize("left", [5.0, 100.0])  # seconds --time leaves; the fine-tune takes 20
def test_under_a_time_limit_the_export_fine_tunes_only_if_time_is_left(
    trained, digits, tmp_path, monkeypatch, left
):
    """An export's candidates under --time: the quantization-aware one runs when the
    seconds left cover its predicted seconds, and is otherwise listed, not written, with
    the reason; the other candidates are written either way."""
    model, on_device = trained
    spy = FineTuneSpy()
    monkeypatch.setattr(trial_module, "quantization_aware_finetune", spy)
    config = TrialConfig(arch(), SCHEDULE, CompressConfig("int8", 0.0, "l2", "local"))
    candidates = trial_module.compression_candidates(
        model, config, digits, on_device, tmp_path, 0, ("fp16", "int8"),
        Budgets(params=1e6, size_kb=1e3), seconds_left=lambda: left,
        quantization_aware_seconds=20.0,
    )  # fmt: skip
    by_name = {c.name: c for c in candidates}
    assert by_name["fp16"].written and by_name["int8 post-training"].written
    aware = by_name["int8 quantization-aware"]
    if left >= 20.0:
        assert len(spy.returned) == 1 and aware.written and aware.note == ""
    else:
        assert spy.returned == [] and not aware.written
        expected = f"not run: the fine-tune takes about 20 s and --time leaves {left:.0f} s"
        assert aware.note == expected


def test_flipped_candidates_average_the_mirror_and_count_twice_the_macs(trained, digits, tmp_path):
    """export --flip: each file runs the model on the image and on its mirror and averages
    the outputs; its MACs are counted twice, so a MACs budget between one and two runs
    keeps every flipped file out (listed, not written)."""
    model, on_device = trained
    config = TrialConfig(arch(), SCHEDULE, CompressConfig("fp32", 0.0, "l2", "local"))

    def candidates(flip: bool, budgets: Budgets, folder: str):
        return trial_module.compression_candidates(
            model, config, digits, on_device, tmp_path / folder, 0, ("fp32", "int8"),
            budgets, flip=flip,
        )  # fmt: skip

    loose = Budgets(params=1e6, size_kb=1e3)
    plain = {c.name: c for c in candidates(False, loose, "plain")}
    flipped = {c.name: c for c in candidates(True, loose, "flipped")}
    assert set(flipped) == set(plain)
    for name in ("fp32", "int8 post-training"):
        assert flipped[name].macs == 2 * plain[name].macs
        assert flipped[name].params == plain[name].params
        # The same weights once: the file grows by the flip, not by a second copy.
        assert flipped[name].size_kb < 1.2 * plain[name].size_kb
    x = on_device.inputs(digits.test.images[:16].to(on_device.device), 8).cpu().contiguous()
    session = ort.InferenceSession(str(flipped["fp32"].path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = 0.5 * (model(x) + model(x.flip(3)))
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4)
    # Between one run's MACs and two: the plain files fit, the flipped ones are refused.
    between = Budgets(params=1e6, size_kb=1e3, macs=1.5 * plain["fp32"].macs)
    refused = candidates(True, between, "refused")
    assert all(not c.written and "macs" in c.note for c in refused), [c.note for c in refused]
