"""`compsearch export`: the verified model, its card, and refusing what breaks a budget."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import optuna
import pandas as pd
import pytest
import torch
from sklearn.datasets import load_digits
from test_cli import compsearch

from compsearch.objectives import trial as trial_module
from compsearch.objectives.data import TEST_FRACTION, TEST_SEED, stratified_split
from compsearch.objectives.memory import file_ram_kb
from compsearch.objectives.train import EXPORT_RECIPE, TRANSLATION_FROM_EPOCHS, fit
from compsearch.results.records import SETTINGS_KEY
from compsearch.search import api as compsearch_api
from compsearch.search import cli, common
from compsearch.search.loop import default_schedule
from compsearch.spaces.builder import build
from compsearch.spaces.config import TrialConfig


@pytest.fixture(scope="module")
def study_folder(tmp_path_factory):
    """A small digits study, searched once for every test here."""
    folder = tmp_path_factory.mktemp("export")
    result = compsearch(
        "run", "--budget-params", "2e6", "--budget-kb", "300", "--trials", "3", "--epochs", "2",
        cwd=folder,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return folder


@pytest.fixture(scope="module")
def exported(study_folder):
    result = compsearch("export", "--epochs", "3", cwd=study_folder)
    assert result.returncode == 0, result.stderr
    return study_folder / "runs" / "digits" / "export", result.stdout


def by_hand(card: dict, onnx_path) -> float:
    """Test accuracy obtained by following the card alone: raw scikit-learn digits, the
    card's pixel scaling, mean and std, then onnxruntime on model.onnx."""
    digits = load_digits()
    # The card says which images the test split holds (a fixed stratified 20%).
    assert card["images"]["test"] == round(len(digits.target) * TEST_FRACTION)
    _, test = stratified_split(digits.target, TEST_FRACTION, seed=TEST_SEED)
    prep = card["preprocessing"]
    assert "round(value * 255 / 16)" in prep["source_pixels"]
    pixels = np.clip(np.rint(digits.images[test] * 255 / 16), 0, 255)
    x = pixels[:, None].astype(np.float32) / 255
    mean = np.array(prep["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.array(prep["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    x = ((x - mean) / std).astype(np.float32)
    assert x.shape[1:] == (prep["channels"], prep["resolution"], prep["resolution"])
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits = session.run([prep["output_name"]], {prep["input_name"]: x})[0]
    return float((logits.argmax(1) == digits.target[test]).mean())


def test_export_writes_a_verified_model_and_its_card(exported, study_folder):
    folder, stdout = exported
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.onnx", "model.pt"]
    card = json.loads((folder / "model.json").read_text())
    for key in (
        "config", "budgets", "validation_accuracy", "test_accuracy", "params", "size_kb",
        "macs", "seed", "packages", "sha256", "preprocessing",
    ):  # fmt: skip
        assert key in card, key
    assert card["sha256"] == hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()
    assert card["size_kb"] == (folder / "model.onnx").stat().st_size / 1000
    assert card["size_kb"] <= card["budgets"]["size_kb"]
    assert card["params"] <= card["budgets"]["params"]
    assert card["epochs"] == 3
    # Trained: with the fine-tune stretched by the share pruned (3 epochs: 1 fine-tune).
    config = TrialConfig.from_dict(card["config"])
    assert card["epochs_trained"] == config.epochs == 2 + config.finetune_epochs
    assert card["ram_kb"] == file_ram_kb(folder / "model.onnx") > 0
    assert {"torch", "onnxruntime", "optuna"} <= set(card["packages"])
    assert f"{card['test_accuracy']:.2%}" in stdout
    # best: the most accurate feasible trial of the study (the smaller file on a tie).
    trials = pd.read_csv(study_folder / "runs" / "digits" / "trials.csv")
    feasible = trials[trials["feasible"]].sort_values(["accuracy", "size_kb"])
    best = feasible[feasible["accuracy"] == feasible["accuracy"].max()].iloc[0]
    assert card["trial"] == best["number"]


def test_export_keeps_the_most_accurate_candidate_within_the_budgets(exported):
    folder, stdout = exported
    card = json.loads((folder / "model.json").read_text())
    candidates = card["candidates"]
    assert [c["name"] for c in candidates] == [
        "fp32", "fp16", "int8 post-training", "int8 quantization-aware",
    ]  # fmt: skip
    fitting = [c for c in candidates if c["written"] and c["within_budgets"]]
    assert fitting
    best = max(fitting, key=lambda c: (c["validation_accuracy"], -c["size_kb"]))
    assert [c for c in candidates if c["chosen"]] == [best]
    assert card["validation_accuracy"] == best["validation_accuracy"]
    assert card["size_kb"] == pytest.approx(best["size_kb"], abs=1e-3)
    assert card["precision"] == best["precision"]
    assert card["quantization_aware"] == best["quantization_aware"]
    for candidate in candidates:
        assert candidate["name"] in stdout


def test_the_choice_of_candidate_skips_what_breaks_a_budget_or_was_not_written():
    from compsearch.objectives.trial import Candidate, best_candidate
    from compsearch.spaces.budgets import Budgets

    def candidate(name, accuracy, size_kb, written=True):
        path = Path(f"{name}.onnx") if written else None
        return Candidate(name, "int8", False, accuracy, 1000, 1000, size_kb, 1.0, 0.1, path, None)

    budgets = Budgets(params=1e6, size_kb=10.0, ram_kb=2.0, latency_ms=1.0)
    over = candidate("over", 0.99, 12.0)
    over_ram = dataclasses.replace(candidate("over_ram", 0.99, 5.0), ram_kb=2.5)
    too_slow = dataclasses.replace(candidate("too_slow", 0.99, 5.0), latency_ms=1.5)
    unwritten = candidate("unwritten", 0.98, 5.0, written=False)
    large, small = candidate("large", 0.9, 9.0), candidate("small", 0.9, 4.0)
    worse = candidate("worse", 0.8, 1.0)
    choices = [over, over_ram, too_slow, unwritten, large, small, worse]
    assert best_candidate(choices, budgets) is small
    assert best_candidate([over, over_ram, too_slow, unwritten], budgets) is None


def test_following_the_card_by_hand_reproduces_its_test_accuracy(exported):
    folder, _ = exported
    card = json.loads((folder / "model.json").read_text())
    assert by_hand(card, folder / "model.onnx") == card["test_accuracy"]
    assert card["test_accuracy"] > 0.5  # a trained model, not chance (10 classes)


def test_the_report_shows_the_exported_figures(exported):
    folder, stdout = exported
    card = json.loads((folder / "model.json").read_text())
    report = folder.parent / "report.html"
    assert "runs/digits/report.html" in stdout
    export_section = report.read_text().split("<h2>Export</h2>")[1].split("<h2>")[0]
    assert "Not exported yet" not in export_section
    for figure in (
        f"{card['test_accuracy']:.2%}",
        f"{card['validation_accuracy']:.2%}",
        f"{card['size_kb']:.1f} KB",
        f"{card['params']:,}",
        card["sha256"],
    ):
        assert figure in export_section, figure


def test_model_pt_loads_without_unpickling_and_rebuilds_the_file(exported):
    folder, _ = exported
    saved = torch.load(folder / "model.pt", weights_only=True)
    config = TrialConfig.from_dict(saved["config"])
    model = build(config.arch).eval()
    model.load_state_dict(saved["state_dict"])
    card = json.loads((folder / "model.json").read_text())
    assert sum(p.numel() for p in model.parameters()) == card["params"]
    if config.compress.precision == "fp32":
        x = torch.randn(4, 1, 8, 8)
        session = ort.InferenceSession(str(folder / "model.onnx"))
        expected = session.run(None, {"input": x.numpy()})[0]
        np.testing.assert_allclose(model(x).detach().numpy(), expected, atol=1e-4, rtol=1e-4)


def test_an_export_over_budget_writes_nothing_and_exits_2(study_folder):
    """Budgets tightened after the search: the retrained file breaks them, so export
    refuses with the figures and leaves the previous export as it was."""
    url = f"sqlite:///{study_folder / 'runs' / 'digits' / 'study.db'}"
    study = optuna.load_study(study_name="digits", storage=url)
    settings = dict(study.user_attrs[SETTINGS_KEY])
    folder = study_folder / "runs" / "digits" / "export"
    before = {p.name: p.read_bytes() for p in folder.iterdir()} if folder.exists() else {}
    trials = pd.read_csv(study_folder / "runs" / "digits" / "trials.csv")
    trained = str(trials[trials["trained"]]["number"].iloc[0])
    try:
        study.set_user_attr(
            SETTINGS_KEY, {**settings, "budgets": {**settings["budgets"], "size_kb": 0.5}}
        )
        result = compsearch("export", "--trial", trained, "--epochs", "2", cwd=study_folder)
    finally:
        study.set_user_attr(SETTINGS_KEY, settings)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "no file of trial" in lines[0] and "nothing was written" in lines[0]
    assert "size_kb" in lines[0] and "0.5 KB" in lines[0]
    after = {p.name: p.read_bytes() for p in folder.iterdir()} if folder.exists() else {}
    assert after == before
    assert not list((study_folder / "runs" / "digits").glob(".export-*"))


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--trial", "99"], "has no trial 99"),
        (["--trial", "first"], "--trial must be best or a trial number"),
        (["--epochs", "1"], "--epochs must be at least 2"),
        (["--study", "nothing"], "no study 'nothing'"),
        (["--teacher", "missing.pt"], "is not a file"),
        (["--flip"], "export without --flip"),  # a mirrored digit may be another class
    ],
)
def test_bad_export_requests_exit_2_with_one_line(study_folder, args, fragment):
    result = compsearch("export", *args, cwd=study_folder)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr


def test_export_of_a_study_with_no_feasible_trial_says_so(tmp_path):
    study_dir = tmp_path / "runs" / "digits"
    study_dir.mkdir(parents=True)
    storage = f"sqlite:///{study_dir / 'study.db'}"
    study = optuna.create_study(
        study_name="digits", storage=storage, directions=["maximize", "minimize"]
    )
    study.set_user_attr(
        SETTINGS_KEY,
        {"dataset": "digits", "budgets": {"params": 1e3, "size_kb": 1.0, "macs": None}},
    )
    result = compsearch("export", cwd=tmp_path)
    assert result.returncode == 2
    assert "no feasible trial" in result.stderr


def test_an_export_without_epochs_trains_three_times_the_trials_epochs(
    tmp_path, monkeypatch, capsys
):
    """`--epochs` left out: the config is trained for EXPORT_EPOCH_FACTOR times the
    trial's epochs, counted at the training loop itself, untranslated as the trial (6
    epochs); `--epochs TRANSLATION_FROM_EPOCHS` trains with the export's recipe (images
    translated, where the trial's are not). One small trial of 2 epochs."""
    (tmp_path / "small.toml").write_text(
        'stages = 2\nwidth = [8, 16]\nprecisions = ["fp32"]\nprune_fraction = [0.0, 0.0]\n'
    )
    out = str(tmp_path / "runs")
    phases = []

    def counted_fit(model, on_device, phase, *args, **kwargs):
        phases.append(phase)
        return fit(model, on_device, phase, *args, **kwargs)

    monkeypatch.setattr(trial_module, "fit", counted_fit)
    assert cli.main(
        ["run", "--budget-params", "2e6", "--budget-kb", "300", "--trials", "1", "--epochs", "2",
         "--subset", "200", "--space", str(tmp_path / "small.toml"), "--out", out,
         "--device", "cpu"]
    ) == 0  # fmt: skip
    assert phases and {phase.recipe.translation for phase in phases} == {0.0}
    phases.clear()
    capsys.readouterr()
    assert cli.main(["export", "--out", out, "--device", "cpu"]) == 0
    assert {phase.recipe.translation for phase in phases} == {0.0}
    folder = tmp_path / "runs" / "digits"
    card = json.loads((folder / "export" / "model.json").read_text())
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{folder / 'study.db'}")
    trial_epochs = study.trials[card["trial"]].user_attrs["config"]["train"]["epochs"]
    assert trial_epochs == 2
    expected = common.EXPORT_EPOCH_FACTOR * trial_epochs
    assert sum(phase.epochs for phase in phases) == expected  # low resolution + fine-tune
    assert card["epochs"] == card["config"]["train"]["epochs"] == expected
    assert f"{expected} epochs on" in capsys.readouterr().out
    phases.clear()
    long = ["--epochs", str(TRANSLATION_FROM_EPOCHS)]
    assert cli.main(["export", "--out", out, "--device", "cpu", *long]) == 0
    assert {phase.recipe for phase in phases} == {EXPORT_RECIPE}
    assert EXPORT_RECIPE.translation > 0
    assert sum(phase.epochs for phase in phases) == TRANSLATION_FROM_EPOCHS


def test_an_export_given_a_time_sizes_its_epochs_from_the_trials_own_speed(study_folder):
    """`--time`: epochs = the share of the time for training / (the trial's seconds of
    training per image and epoch x the export's training images); twice the time, about
    twice the epochs. The trial's writing and measuring are not counted as training."""
    from compsearch.search.jobs import (
        TRAINING_SHARE_OF_TIME,
        epochs_for_time,
        lost_to_post_training,
    )

    study = optuna.load_study(
        study_name="digits", storage=f"sqlite:///{study_folder / 'runs/digits/study.db'}"
    )
    record = compsearch_api.show(out=study_folder / "runs").best
    assert 0 < record.train_seconds < record.seconds
    assert study.trials[record.number].user_attrs["train_seconds"] == record.train_seconds
    images = 1151  # digits' training split
    # The trial trained at its rung, on part of them.
    trial_images = record.train_images
    assert 0 < trial_images <= images
    # Epochs as trained: with the fine-tune pruning stretched, of which the schedule's
    # epochs are this share.
    per_image_epoch = record.train_seconds / (record.config.epochs * trial_images)
    schedule_share = record.config.train.epochs / record.config.epochs
    seconds = 40.5 * per_image_epoch * images  # 40.5 of the trial's epochs, off any rounding edge
    assert epochs_for_time(record, None, images, seconds) == int(
        40.5 * TRAINING_SHARE_OF_TIME * schedule_share
    )
    assert epochs_for_time(record, None, images, 2 * seconds) == int(
        81 * TRAINING_SHARE_OF_TIME * schedule_share
    )
    assert epochs_for_time(record, None, images, 1e-3) == 2  # never below train + fine-tune
    # A study from before training seconds were recorded: the trial's whole seconds,
    # longer, so fewer epochs.
    untimed = dataclasses.replace(record, train_seconds=math.nan)
    assert epochs_for_time(untimed, None, images, seconds) < epochs_for_time(
        record, None, images, seconds
    )
    # A trial from before fidelities trained on --subset images, or all: 200 images per
    # epoch cost more per image than the whole split would.
    older = dataclasses.replace(record, train_images=None)
    assert epochs_for_time(older, 200, images, seconds) < epochs_for_time(
        older, None, images, seconds
    )
    assert study.trials[record.number].user_attrs["seconds"] == record.seconds
    result = compsearch("export", "--time", f"{seconds / 4:.3f}", cwd=study_folder)
    assert result.returncode == 0, result.stderr
    card = json.loads((study_folder / "runs/digits/export/model.json").read_text())
    # Time is kept for a quantization-aware fine-tune when the trial's int8 file lost to
    # post-training quantization.
    assert card["epochs"] == epochs_for_time(
        record, None, images, float(f"{seconds / 4:.3f}"),
        quantization_aware=lost_to_post_training(record),
    )  # fmt: skip
    assert epochs_for_time(record, None, images, seconds, quantization_aware=True) < (
        epochs_for_time(record, None, images, seconds)
    )
    assert "sized to --time" in result.stdout


def test_the_export_help_states_the_epoch_factor_the_export_uses(capsys):
    with pytest.raises(SystemExit):
        cli.main(["export", "--help"])
    assert f"{common.EXPORT_EPOCH_FACTOR} times the trial's" in capsys.readouterr().out


def test_a_flipped_export_averages_each_image_and_its_mirror_and_counts_both_runs(tmp_path):
    """export --flip on images a mirror keeps in their class: the file runs the network on
    both, its card says so and counts the MACs of both; model.pt holds the network once."""
    from PIL import Image

    from compsearch.objectives.measure import count_macs

    rng = np.random.default_rng(0)
    for name, channel in (("red", 0), ("blue", 2)):
        (tmp_path / "pictures" / name).mkdir(parents=True)
        for n in range(30):
            pixels = rng.integers(0, 120, (16, 16, 3), dtype=np.uint8)
            pixels[:, : rng.integers(4, 16), channel] += 120
            Image.fromarray(pixels).save(tmp_path / "pictures" / name / f"{n}.png")
    dataset = f"folder:{tmp_path / 'pictures'}"
    result = compsearch(
        "run", "--budget-params", "2e6", "--budget-kb", "300", "--dataset", dataset,
        "--trials", "1", "--epochs", "2", "--no-anchors", "--study", "pictures", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    result = compsearch("export", "--flip", "--epochs", "2", "--study", "pictures", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "flip-averaged file (twice the MACs)" in result.stdout
    folder = tmp_path / "runs" / "pictures" / "export"
    card = json.loads((folder / "model.json").read_text())
    assert card["flip_test_time_augmentation"] is True
    assert "mirror" in card["files"]["model.onnx"]
    saved = torch.load(folder / "model.pt", weights_only=True)
    assert saved["facts"]["flip_test_time_augmentation"] is True
    config = TrialConfig.from_dict(saved["config"])
    model = build(config.arch).eval()
    model.load_state_dict(saved["state_dict"])  # the network alone, no wrapper
    assert card["macs"] == 2 * count_macs(model, 3, 16)
    if config.compress.precision == "fp32":
        x = torch.randn(4, 3, 16, 16)
        session = ort.InferenceSession(str(folder / "model.onnx"))
        (got,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            expected = 0.5 * (model(x) + model(x.flip(3)))
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, rtol=1e-4)


def test_an_export_whose_pruned_widths_break_the_budgets_stops_before_its_fine_tune(
    tmp_path, monkeypatch, capsys
):
    """Budgets tightened after the search below anything the trial's pruned widths can
    hold: the export stops once pruned, having trained only the low-resolution phase,
    says why and writes nothing."""
    (tmp_path / "plain.toml").write_text(
        "stages = 1\ndepth = [2, 2]\nwidth = [32, 32]\nstem_width = [16, 16]\n"
        'kernel_sizes = [3]\nstrides = [1]\nblocks = ["plain"]\nsqueeze_excitation = [false]\n'
        'activations = ["relu"]\nprecisions = ["fp32"]\nprune_fraction = [0.7, 0.7]\n'
        'prune_criteria = ["l2"]\nprune_scopes = ["global"]\n'
    )
    out = str(tmp_path / "runs")
    assert cli.main(
        ["run", "--budget-params", "2e6", "--budget-kb", "300", "--trials", "1", "--epochs", "2",
         "--subset", "200", "--space", str(tmp_path / "plain.toml"), "--out", out,
         "--device", "cpu"]
    ) == 0  # fmt: skip
    folder = tmp_path / "runs" / "digits"
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{folder / 'study.db'}")
    (trial,) = study.trials
    assert trial.user_attrs["params"] > 1000
    settings = dict(study.user_attrs[SETTINGS_KEY])
    budgets = {**settings["budgets"], "params": 1000}
    study.set_user_attr(SETTINGS_KEY, {**settings, "budgets": budgets})
    phases = []

    def counted_fit(model, on_device, phase, *args, **kwargs):
        phases.append(phase)
        return fit(model, on_device, phase, *args, **kwargs)

    monkeypatch.setattr(trial_module, "fit", counted_fit)
    capsys.readouterr()
    export = ["export", "--trial", str(trial.number), "--out", out, "--device", "cpu"]
    assert cli.main(export) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    (low_resolution,) = phases  # the fine-tune never ran
    schedule = default_schedule(common.EXPORT_EPOCH_FACTOR * 2, 8)  # digits: 8 px
    assert low_resolution.epochs == schedule.epochs - schedule.finetune_epochs
    assert f"no file of trial {trial.number}'s retrained model can meet" in line
    assert "over budget after pruning, before the fine-tune: params" in line
    assert "nothing was written" in line
    assert not (folder / "export").exists()
    assert not list(folder.glob(".export-*"))
