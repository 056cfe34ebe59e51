"""`export --format tflite`: an int8 `.tflite` file measured in LiteRT, its peak memory
and its C array. Needs the extra compsearch[tflite]; without it only the refusal is
tested."""

from __future__ import annotations

import importlib.util
import json
import re

import numpy as np
import pytest
import torch
from torch import nn

from compsearch.objectives.tflite import missing_tflite
from compsearch.search import cli

MISSING = missing_tflite()
needs_tflite = pytest.mark.skipif(
    MISSING is not None, reason=f"the tflite extra is not installed ({MISSING})"
)


def test_format_tflite_without_its_extra_exits_2_with_how_to_install(tmp_path, monkeypatch, capsys):
    """Before any data is read or study opened: one line naming the missing package and
    the install command; nothing written."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "litert_torch" else real(name, *args),
    )
    out = tmp_path / "runs"
    assert cli.main(["export", "--format", "tflite", "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "litert-torch" in error and "pip install 'compsearch[tflite]'" in error
    assert not out.exists()


def chain() -> nn.Module:
    """1x8x8 -> 4 channels -> 8 channels -> mean -> 10 logits."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    ).eval()  # fmt: skip


@pytest.fixture(scope="module")
def chain_file(tmp_path_factory):
    from compsearch.objectives.tflite import write_tflite

    images = np.random.default_rng(0).standard_normal((96, 1, 8, 8)).astype(np.float32)
    path = tmp_path_factory.mktemp("tflite") / "chain.tflite"
    return write_tflite(chain(), images[:64], path), images[64:]


@needs_tflite
def test_a_plain_chain_peaks_at_the_second_convolution_in_int8(chain_file):
    """Hand-computed: the second convolution holds its input (4 x 8 x 8 bytes) and its
    output (8 x 8 x 8) at once, 768 bytes, more than any other operator; the file's
    input and output are int8."""
    from compsearch.objectives.tflite import load, tflite_graph, tflite_ram_kb

    written, _ = chain_file
    interpreter = load(written.path)
    assert interpreter.get_input_details()[0]["dtype"] == np.int8
    assert interpreter.get_output_details()[0]["dtype"] == np.int8
    graph = tflite_graph(written.path)
    assert 4 * 8 * 8 in graph.sizes and 8 * 8 * 8 in graph.sizes
    assert tflite_ram_kb(written.path) == pytest.approx((4 * 8 * 8 + 8 * 8 * 8) / 1000)


@needs_tflite
def test_the_int8_file_computes_what_the_model_does(chain_file):
    """LiteRT's int8 outputs, dequantized, within a few quantization steps of torch's."""
    from compsearch.objectives.tflite import tflite_logits

    written, images = chain_file
    expected = chain()(torch.from_numpy(images)).detach().numpy()
    logits = tflite_logits(written.path, images)
    spread = expected.max() - expected.min()
    assert np.abs(logits - expected).max() < 0.15 * spread
    assert np.abs(logits - expected).mean() < 0.03 * spread


@needs_tflite
def test_the_output_range_holds_every_logit_the_calibration_images_gave(tmp_path):
    """Calibration images of very different scales: the file's output range covers the
    lowest and highest logit torch gives on them (a moving average of each image's
    extremes, the quantizer's own way, ends well inside, and the largest logits saturate
    and tie)."""
    from compsearch.objectives.tflite import write_tflite

    rng = np.random.default_rng(1)
    scales = np.geomspace(0.1, 4.0, 64, dtype=np.float32)[:, None, None, None]
    images = (rng.standard_normal((64, 1, 8, 8)) * scales).astype(np.float32)
    rng.shuffle(images)  # the largest are not last, where a moving average would end
    written = write_tflite(chain(), images, tmp_path / "chain.tflite")
    logits = chain()(torch.from_numpy(images)).detach().numpy()
    step = written.output.scale
    highest = written.output.scale * (127 - written.output.zero_point)
    lowest = written.output.scale * (-128 - written.output.zero_point)
    assert highest >= logits.max() - step and lowest <= logits.min() + step


@needs_tflite
def test_a_model_whose_weights_are_channels_last_converts_the_same(chain_file, tmp_path):
    """As the trainer leaves them: the same outputs as from contiguous weights."""
    from compsearch.objectives.tflite import tflite_logits, write_tflite

    _, images = chain_file
    import optuna

    from compsearch.search.anchors import ANCHORS, anchor_params
    from compsearch.search.loop import default_schedule
    from compsearch.spaces.builder import build
    from compsearch.spaces.space import sample, space_for

    space = space_for(1, 10, 8)
    params = anchor_params(ANCHORS["resnet8"], space)
    torch.manual_seed(0)
    model = build(sample(optuna.trial.FixedTrial(params), space, default_schedule(2, 8)).arch)
    for module in model.modules():  # statistics as training leaves them
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    model = model.eval()
    rng = np.random.default_rng(1)
    calibration = rng.standard_normal((8, 1, 8, 8)).astype(np.float32)
    files = [
        write_tflite(model, calibration, tmp_path / "contiguous.tflite"),
        write_tflite(
            model.to(memory_format=torch.channels_last), calibration, tmp_path / "last.tflite"
        ),
    ]
    np.testing.assert_array_equal(
        tflite_logits(files[0].path, images), tflite_logits(files[1].path, images)
    )


@needs_tflite
@needs_tflite
def test_a_grouped_convolution_runs_in_litert(tmp_path):
    """A config of the space with a grouped block: its int8 file loads and computes what
    the model does (LiteRT's XNNPACK delegate refused it: "failed to create XNNPACK
    runtime", so the interpreter runs builtin kernels)."""
    from compsearch.objectives.tflite import tflite_logits, write_tflite
    from compsearch.spaces.builder import build
    from compsearch.spaces.config import ArchConfig, StageConfig

    arch = ArchConfig(
        in_channels=1, num_classes=10, stem_width=24, stem_kernel_size=3, activation="relu",
        leaky_relu_slope=0.1,
        stages=(
            StageConfig(block="plain", depth=2, width=4, kernel_size=5, stride=2,
                        hidden_widths=(4, 4), projection=True, groups=1, squeeze_widths=(1, 1)),
            StageConfig(block="grouped", depth=1, width=23, kernel_size=3, stride=1,
                        hidden_widths=(20,), projection=True, groups=4, squeeze_widths=(5,)),
        ),
    )  # fmt: skip
    torch.manual_seed(0)
    model = build(arch).eval()
    images = np.random.default_rng(0).standard_normal((96, 1, 28, 28)).astype(np.float32)
    written = write_tflite(model, images[:64], tmp_path / "grouped.tflite")
    logits = tflite_logits(written.path, images[64:])
    with torch.no_grad():
        expected = model(torch.from_numpy(images[64:])).numpy()
    spread = expected.max() - expected.min()
    assert np.abs(logits - expected).max() < 0.15 * spread
    assert np.abs(logits - expected).mean() < 0.03 * spread


def test_the_c_array_holds_the_files_bytes(chain_file, tmp_path):
    from compsearch.objectives.tflite import ARRAY_NAME, c_array

    written, _ = chain_file
    c_array(written.path, tmp_path / "model_data.cc", tmp_path / "model_data.h")
    source = (tmp_path / "model_data.cc").read_text()
    data = bytes(int(value, 16) for value in re.findall(r"0x([0-9a-f]{2})", source))
    assert data == written.path.read_bytes()
    assert f"{ARRAY_NAME}_len = {len(data)};" in source
    assert "alignas(16)" in source
    assert f"extern const unsigned char {ARRAY_NAME}[];" in (tmp_path / "model_data.h").read_text()


@needs_tflite
def test_export_format_tflite_writes_a_measured_int8_file(tmp_path, capsys):
    """A digits study, exported as .tflite: the card's LiteRT accuracy is the file's when
    measured again, close to the ONNX file's; its bytes and sha256 are the file's; its
    peak memory is the graph's; the C array and the card's budgets agree with it. A later
    ONNX export removes the .tflite files its card no longer describes."""
    from compsearch.objectives.data import load_dataset
    from compsearch.objectives.tflite import tflite_accuracy, tflite_ram_kb
    from compsearch.results.export import sha256

    out = tmp_path / "runs"
    small = tmp_path / "small.toml"
    small.write_text('stages = 2\nwidth = [8, 16]\nprecisions = ["int8"]\n')
    assert cli.main(
        ["run", "--budget-params", "2e6", "--budget-kb", "300", "--trials", "1", "--epochs", "4",
         "--space", str(small), "--out", str(out), "--device", "cpu"]
    ) == 0  # fmt: skip
    assert cli.main(["export", "--format", "tflite", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    folder = out / "digits" / "export"
    card = json.loads((folder / "model.json").read_text())
    tflite = card["tflite"]
    path = folder / "model.tflite"
    unwrapped = printed.replace("\n", "")  # the console wraps at its width
    assert "model.tflite:" in unwrapped and str(path) in unwrapped
    assert tflite["sha256"] == sha256(path)
    assert tflite["size_kb"] == path.stat().st_size / 1000 <= card["budgets"]["size_kb"]
    assert tflite["ram_kb"] == pytest.approx(tflite_ram_kb(path))
    data = load_dataset("digits", seed=card["seed"])
    assert tflite["test_accuracy"] == tflite_accuracy(path, data.test, data, data.resolution)
    assert tflite["validation_accuracy"] == max(tflite["candidates"].values())
    assert tflite["validation_accuracy"] == tflite_accuracy(path, data.val, data, data.resolution)
    assert tflite["test_accuracy"] > card["test_accuracy"] - 0.03
    assert tflite["input"]["dtype"] == "int8" and tflite["input"]["scale"] > 0
    assert set(card["files"]) >= {"model.onnx", "model.tflite", "model_data.cc", "model_data.h"}
    source = (folder / "model_data.cc").read_text()
    assert f"g_model_len = {path.stat().st_size};" in source
    assert "litert-torch" in card["packages"]

    assert cli.main(["export", "--out", str(out), "--device", "cpu", "--epochs", "2"]) == 0
    assert not path.exists() and not (folder / "model_data.cc").exists()
    assert "tflite" not in json.loads((folder / "model.json").read_text())


CONVERT = """
import sys
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
from test_tflite import chain
from compsearch.objectives.tflite import tflite_logits, write_tflite
images = np.random.default_rng(0).standard_normal((96, 1, 8, 8)).astype(np.float32)
written = write_tflite(chain(), images[:64], Path(sys.argv[2]))
np.save(sys.argv[3], tflite_logits(written.path, images[64:]))
"""


DEAD_UNIT = """
import sys
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
from test_tflite import chain
from compsearch.objectives.tflite import tflite_logits, write_tflite
model = chain()
with torch.no_grad():
    model[0].bias.fill_(-1e3)  # no image wakes the first layer: the second reads zeros
images = np.random.default_rng(0).standard_normal((96, 1, 8, 8)).astype(np.float32)
written = write_tflite(model, images[:64], Path(sys.argv[2]))
expected = model(torch.from_numpy(images[64:])).detach().numpy()
print(np.abs(tflite_logits(written.path, images[64:]) - expected).max())
"""


@needs_tflite
def test_a_tensor_that_calibration_saw_only_as_zeros_does_not_crash_the_process(tmp_path):
    """A zero range quantized the next layer's biases by a scale of 0, and LiteRT aborted
    the process loading the file: so in a child process, which must exit cleanly with
    the file computing what the model does (its constant output)."""
    import subprocess
    import sys
    from pathlib import Path

    tests = str(Path(__file__).parent)
    done = subprocess.run(
        [sys.executable, "-c", DEAD_UNIT, tests, str(tmp_path / "dead.tflite")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) < 0.05


@needs_tflite
def test_the_file_does_not_depend_on_the_processs_hash_seed(tmp_path):
    """The same model converted in two processes whose string hashing differs
    (PYTHONHASHSEED) computes the same outputs."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = str(Path(__file__).parent)
    outputs = []
    for seed in ("1", "2"):
        logits = tmp_path / f"logits-{seed}.npy"
        environment = os.environ | {"PYTHONHASHSEED": seed}
        subprocess.run(
            [sys.executable, "-c", CONVERT, tests, str(tmp_path / f"{seed}.tflite"), str(logits)],
            check=True, env=environment, capture_output=True,
        )  # fmt: skip
        outputs.append(np.load(logits))
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_silenced_sends_what_is_written_to_the_terminal_nowhere_and_restores_it(capfd):
    """What the converter prints (Python or C, to either stream) is dropped; what comes
    after reaches the terminal again."""
    import os

    from compsearch.objectives.tflite import silenced

    with silenced():
        os.write(1, b"converter progress\n")
        os.write(2, b"converter log\n")
        print("more progress")
    print("after")
    os.write(2, b"error after\n")
    captured = capfd.readouterr()
    assert captured.out == "after\n" and captured.err == "error after\n"


def pruned_sample_file(trial, space, seed: int, path):
    """A config of `space` drawn by the Optuna `trial`, pruned locally as sampled (where
    the estimates are exact), its model (weights seeded by `seed`) written as an int8
    .tflite file at `path` from random 32x32 images; the config and the file's path."""
    import dataclasses

    from compsearch.objectives.compress import prune
    from compsearch.objectives.tflite import write_tflite
    from compsearch.spaces.builder import build
    from compsearch.spaces.config import TrainConfig
    from compsearch.spaces.space import sample

    schedule = TrainConfig(0, 0, 0, 0, 64, 0.1, 0.0, 0.0)
    # Two images: a file's bytes and tensor shapes do not depend on its ranges.
    images = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    config = sample(trial, space, schedule)
    compress = dataclasses.replace(config.compress, prune_criterion="l2", prune_scope="local")
    config = dataclasses.replace(config, compress=compress)
    torch.manual_seed(seed)
    model = build(config.arch).eval()
    prune(model, config.arch, compress, torch.zeros(1, 3, 32, 32))
    return config, write_tflite(model, images, path).path


@needs_tflite
def test_the_tflite_byte_estimate_is_close_to_the_written_files(tmp_path):
    """Sampled configs of the CIFAR-10 space, pruned as sampled (locally, where the
    estimate is exact in params), written as int8 .tflite files: the estimate within 3%
    of their bytes (bench/calibrate_onnx_bytes.py --format tflite fits its constants)."""
    import dataclasses

    import optuna

    from compsearch.spaces.estimate import estimate
    from compsearch.spaces.space import space_for

    space = dataclasses.replace(space_for(3, 10, 32), precisions=("int8",))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for index in range(3):
        config, path = pruned_sample_file(study.ask(), space, index, tmp_path / f"{index}.tflite")
        expected = estimate(config, "tflite").file_bytes
        assert expected == pytest.approx(path.stat().st_size, rel=0.03), config


@needs_tflite
def test_the_peak_memory_estimate_equals_the_tflite_files(tmp_path):
    """Sampled configs of the CIFAR-10 space as searched under --format tflite (int8, no
    leaky ReLU), pruned locally as sampled and written as .tflite files: the estimate
    from the config equals the peak counted over each file's own graph, PAD and
    TRANSPOSE operators included. Every block type is drawn at least once."""
    import dataclasses

    import optuna

    from compsearch.objectives.tflite import tflite_ram_kb
    from compsearch.search.options import for_format
    from compsearch.spaces.estimate import estimate
    from compsearch.spaces.space import space_for

    base = for_format(space_for(3, 10, 32), "tflite", None)
    for index, block in enumerate(base.blocks):
        space = dataclasses.replace(base, blocks=(block,), stages=2)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=index))
        config, path = pruned_sample_file(study.ask(), space, index, tmp_path / f"{block}.tflite")
        assert estimate(config, "tflite").ram_bytes == round(1000 * tflite_ram_kb(path)), config


@needs_tflite
def test_run_format_tflite_measures_every_trial_as_its_tflite_file(tmp_path, capsys):
    """`run --format tflite`: every trial int8, its accuracy, bytes and peak memory those
    of its .tflite file in LiteRT, the ONNX file's accuracy beside them; the study keeps
    its format (run again with another: exit 2 naming both), and `export` without
    --format writes the .tflite file too."""
    import pandas as pd

    from compsearch.objectives.data import load_dataset
    from compsearch.objectives.tflite import tflite_accuracy, tflite_ram_kb

    out = tmp_path / "runs"
    small = tmp_path / "small.toml"
    small.write_text("stages = 2\nwidth = [8, 16]\n")  # every precision: narrowed to int8
    run = ["run", "--budget-params", "2e6", "--budget-kb", "300", "--epochs", "3",
           "--space", str(small), "--out", str(out), "--device", "cpu", "--no-anchors"]  # fmt: skip
    assert cli.main([*run, "--trials", "2", "--format", "tflite"]) == 0
    folder = out / "digits"
    rows = pd.read_csv(folder / "trials.csv")
    trained = rows[rows["trained"] == True]  # noqa: E712
    assert len(trained) >= 2
    assert set(rows["param_precision"].dropna()) == {"int8"}
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    searched = tomllib.loads((folder / "space.toml").read_text())
    assert searched["precisions"] == ["int8"] and "leaky_relu" not in searched["activations"]
    data = load_dataset("digits", seed=0)
    estimated_exactly = 0
    for row in trained.itertuples():
        path = folder / row.tflite_path
        assert path.suffix == ".tflite" and (folder / row.onnx_path).exists()
        assert row.size_kb == path.stat().st_size / 1000
        assert row.accuracy == tflite_accuracy(path, data.val, data, data.resolution)
        assert row.ram_kb == pytest.approx(tflite_ram_kb(path))
        assert 0 < row.onnx_accuracy <= 1 and row.latency_ms > 0
        assert 0 < row.tflite_seconds < row.seconds
        if row.param_prune_scope == "local" or row.param_prune_fraction == 0:
            # Widths known before training: the byte estimate is the fit's alone.
            assert abs(row.estimated_size_kb / row.size_kb - 1) < 0.05
            estimated_exactly += 1
    assert estimated_exactly > 0
    capsys.readouterr()
    assert cli.main(["show", "--out", str(out)]) == 0
    assert "accuracy: the `.tflite` file in LiteRT" in capsys.readouterr().out.replace("\n", " ")
    assert cli.main([*run, "--trials", "1"]) == 2
    assert "was created with --format tflite, not onnx" in capsys.readouterr().err
    assert cli.main(["export", "--out", str(out), "--device", "cpu", "--epochs", "2"]) == 0
    card = json.loads((folder / "export" / "model.json").read_text())
    assert card["tflite"]["size_kb"] == (folder / "export" / "model.tflite").stat().st_size / 1000
