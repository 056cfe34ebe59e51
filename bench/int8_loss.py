"""Where int8 loses accuracy: per kind of tensor, per calibration, per tensor, on CIFAR-10.

For each network, trained here or loaded from `--models` (where an earlier run of this
script saved it), the search's int8 file (`compress.to_int8`: per-channel symmetric
weights up to +-64, uint8 activations over min-max ranges of 256 training images, QDQ
format) is taken apart and measured on the test split in onnxruntime:

- as it runs (onnxruntime's fused integer kernels) and as its arithmetic says (fusion
  off: every quantize-dequantize pair computed in float), beside the same file with
  full-range weights (up to +-127, as before): the gap between the two runs is what the
  CPU's kernels lose, not the file;
- after the quantization-aware fine-tune that trials and exports share
  (`trial.quantization_aware_copy`), the int8 file of the fine-tuned copy, measured both
  ways, and the fine-tune's seconds beside the training's;

- by kind of tensor (`KINDS`): the file with that kind back in float (its
  quantize-dequantize pairs removed; for weights, the fp32 initializers put back), and the
  file with only that kind quantized: the points each kind costs, alone and within the
  rest. These run as their arithmetic says: fused, onnxruntime quantizes float weights
  between quantized activations itself (per tensor, to +-127: its WeightBiasQuantization
  pass), so the file with weights in float would not be that;
- by calibration: each of onnxruntime's methods (`CALIBRATION_METHODS`) with 256, 1024
  and 4096 training images;
- by tensor: the signal-to-quantization-noise ratio of every quantized activation, in the
  file (what its own rounding adds) and against the fp32 model (what has piled up there),
  from onnxruntime's qdq_loss_debug; the worst tensors are listed.

Every figure is the accuracy of a real ONNX file in onnxruntime; the removal of pairs
changes nothing else in the file.

    python bench/int8_loss.py --data ../shared/data/cifar10-jpeg --models /tmp/int8-models
    python bench/int8_loss.py --subset 2000 --epochs 2 --networks resnet8 --test-subset 1000
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx
import optuna
import torch
from cifar10_300kb import machine  # bench/, beside this script
from compression_fidelity import architectures, model_path

from compsearch.objectives.catalog import CACHE_FOLDER
from compsearch.objectives.compress import (
    CALIBRATION_METHODS,
    calibration_reader,
    export_fp32,
    sort_topologically,
    to_int8,
)
from compsearch.objectives.data import Dataset, Split, load_dataset
from compsearch.objectives.measure import calibration_images, count_params, onnx_accuracy
from compsearch.objectives.modelfile import load_model, save_model
from compsearch.objectives.train import (
    DeviceData,
    TrainingDiverged,
    accuracy,
    predict,
    spread_sample,
)
from compsearch.objectives.trial import (
    CALIBRATION_IMAGES,
    quantization_aware_copy,
    train_model,
)
from compsearch.search.anchors import ANCHORS, anchor_params
from compsearch.search.jobs import resolve_device
from compsearch.search.loop import default_schedule
from compsearch.spaces.config import CompressConfig, TrialConfig
from compsearch.spaces.space import sample, space_for

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data" / "cifar10-jpeg"
RESULTS = HERE / "results"
FOUND = HERE / "found_network.json"
CALIBRATION_COUNTS = (256, 1024, 4096)
WORST_TENSORS = 8  # tensors listed per network, lowest signal-to-noise first

# The kinds of quantized tensors, in the order the table shows them. A tensor's kind
# comes from the op that writes it and the module path the exporter names it after.
KINDS = (
    "input",  # the image entering the stem
    "weights",  # convolution and classifier weights and biases
    "convolution outputs",  # before the activation (with ReLU, fused: after it)
    "activations",  # outputs of HardSwish, SiLU, LeakyReLU and what they compute inside
    "shortcuts",  # shortcut convolutions' outputs and the residual sums
    "squeeze-excitation",  # pool, reduce, expand, gate and product of every SE module
    "classifier",  # the pooled features entering it and the logits it writes
)


def network_configs(data: Dataset, epochs: int, found: Path) -> dict[str, TrialConfig]:
    """ResNet-8 and ResNet-20 as the search queues them, the found network (its own
    pruning kept, precision left to this script), and compression_fidelity's five."""
    space = space_for(data.channels, len(data.class_names), data.resolution)
    schedule = default_schedule(epochs, data.resolution)
    configs = {
        name: sample(optuna.trial.FixedTrial(anchor_params(ANCHORS[name], space)), space, schedule)
        for name in ("resnet8", "resnet20")
    }
    if found.is_file():
        params = json.loads(found.read_text())["params"]
        configs["found"] = sample(optuna.trial.FixedTrial(params), space, schedule)
    for name, arch in architectures(data.channels, len(data.class_names)).items():
        configs[name] = TrialConfig(arch, schedule, CompressConfig("fp32", 0.0))
    return {
        name: dataclasses.replace(
            config, compress=dataclasses.replace(config.compress, precision="fp32")
        )
        for name, config in configs.items()
    }


def trained(
    name: str, config: TrialConfig, on_device: DeviceData, models: Path, seed: int
) -> tuple[torch.nn.Module, float]:
    """The network trained by the search's trainer, from `models` when a run left it
    there (with the same config), else trained now and saved; and its training seconds."""
    path = model_path(models, name, config.train.epochs, seed)
    if path.is_file():
        saved = load_model(path, "saved model")
        if saved.config is not None and saved.config.arch == config.arch:
            return saved.model, float(saved.facts.get("train_seconds", 0.0))
    started = time.perf_counter()
    model, deployed = train_model(config, on_device, seed=seed)
    seconds = time.perf_counter() - started
    model = model.cpu().eval()
    save_model(path, model, deployed.arch, config, train_seconds=seconds, seed=seed)
    return model, seconds


# --- the int8 file taken apart ---------------------------------------------------------


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {name: node for node in model.graph.node for name in node.output}


def activation_pairs(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Every quantized activation: tensor name -> the QuantizeLinear node that rounds it
    (weights and biases, stored rounded, have no QuantizeLinear)."""
    stored = {tensor.name for tensor in model.graph.initializer}
    return {
        node.input[0]: node
        for node in model.graph.node
        if node.op_type == "QuantizeLinear" and node.input[0] not in stored
    }


def squeeze_scopes(names: Iterable[str]) -> set[str]:
    """Module paths of the squeeze-and-excitation modules: scopes with their own pool
    (the network's last pool is at the top, "/pool/...")."""
    marker = "/pool/GlobalAveragePool_output_0"
    return {name[: -len(marker)] for name in names if name.endswith(marker)} - {""}


def tensor_kind(name: str, writer: onnx.NodeProto | None, squeeze: set[str]) -> str:
    """The KINDS entry of the activation `name`, written by `writer` in the fp32 graph."""
    if writer is None:
        return "input"
    if any(name.startswith(scope + "/") for scope in squeeze):
        return "squeeze-excitation"
    op = writer.op_type
    if "/shortcut/" in name or op == "Add":
        return "shortcuts"
    if op in ("Gemm", "GlobalAveragePool", "Flatten") or name.startswith("logits"):
        return "classifier"
    if op == "Conv":
        return "convolution outputs"
    # ReLU (a convolution's or a residual sum's, rounded once), HardSwish (inlined as
    # HardSigmoid and Mul), SiLU, LeakyReLU
    return "activations"


def writers(int8: onnx.ModelProto, fp32: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """The node that writes each tensor: in the fp32 graph where it is there (the int8
    file drops a ReLU into the rounding before it), else in the int8 file."""
    return producers(int8) | producers(fp32)


def kinds(int8: onnx.ModelProto, fp32: onnx.ModelProto) -> dict[str, str]:
    """Kind of every quantized activation of the QDQ `int8` file, by tensor name."""
    pairs = activation_pairs(int8)
    written = writers(int8, fp32)
    squeeze = squeeze_scopes(pairs)
    return {name: tensor_kind(name, written.get(name), squeeze) for name in pairs}


def fused_relus(int8: onnx.ModelProto, fp32: onnx.ModelProto) -> set[str]:
    """Tensors a ReLU writes in the fp32 graph whose ReLU the int8 file left out: the
    rounding to uint8 from zero clips what it would have."""
    before, after = producers(fp32), producers(int8)
    return {
        name
        for name, node in before.items()
        if node.op_type == "Relu" and name in after and after[name].op_type != "Relu"
    }


def unquantized(
    model: onnx.ModelProto, fp32: onnx.ModelProto, keep_float: Callable[[str], bool],
    weights_float: bool,
) -> onnx.ModelProto:  # fmt: skip
    """A copy of the QDQ `model` in which every activation with keep_float(name) skips its
    quantize-dequantize pair (a ReLU the pair stood for put back), and (`weights_float`)
    every weight and bias is the fp32 model's value instead of its rounded copy."""
    model = copy.deepcopy(model)
    graph = model.graph
    readers = consumers(model)
    relus = fused_relus(model, fp32)
    outputs = {value.name for value in graph.output}
    removed: set[int] = set()
    added: list[onnx.NodeProto] = []
    for name, quantize in activation_pairs(model).items():
        if not keep_float(name):
            continue
        source = name
        if name in relus:
            source = f"{name}_float_relu"
            added.append(onnx.helper.make_node("Relu", [name], [source]))
        for dequantize in readers.get(quantize.output[0], []):
            if dequantize.op_type != "DequantizeLinear":
                continue
            for node in readers.get(dequantize.output[0], []):
                node.input[:] = [source if i == dequantize.output[0] else i for i in node.input]
            if dequantize.output[0] in outputs:  # the logits
                added.append(onnx.helper.make_node("Identity", [source], [dequantize.output[0]]))
            removed.add(id(dequantize))
        removed.add(id(quantize))
    if weights_float:
        original = {tensor.name: tensor for tensor in fp32.graph.initializer}
        stored = {tensor.name for tensor in graph.initializer}
        for node in graph.node:
            if node.op_type != "DequantizeLinear" or node.input[0] not in stored:
                continue
            source = node.input[0].removesuffix("_quantized")
            if source not in original:
                continue
            value = onnx.numpy_helper.to_array(original[source])
            graph.initializer.append(onnx.numpy_helper.from_array(value, node.output[0]))
            removed.add(id(node))
    kept = [node for node in graph.node if id(node) not in removed] + added
    del graph.node[:]
    graph.node.extend(kept)
    sort_topologically(graph)
    onnx.checker.check_model(model)
    return model


# --- measuring -------------------------------------------------------------------------


class Files:
    """ONNX files in one folder, measured on one test split."""

    def __init__(self, folder: Path, data: Dataset, test: Split, resolution: int) -> None:
        self.folder, self.data, self.test, self.resolution = folder, data, test, resolution
        self.count = 0

    def accuracy(self, model: onnx.ModelProto, fused: bool = True) -> float:
        """Top-1 of `model` in onnxruntime; `fused=False`: its arithmetic, in float."""
        self.count += 1
        path = self.folder / f"{self.count}.onnx"
        onnx.save(model, path)
        return onnx_accuracy(path, self.test, self.data, self.resolution, fused=fused)


def prepared_fp32(model: torch.nn.Module, resolution: int, channels: int) -> onnx.ModelProto:
    """The fp32 export after onnxruntime's pre-processing, as `to_int8` quantizes it:
    initializer names match the int8 file's."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as folder:
        source, prepared = Path(folder) / "fp32.onnx", Path(folder) / "prepared.onnx"
        onnx.save(export_fp32(model, resolution, channels), source)
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        return onnx.load(prepared)


def signal_to_noise(
    fp32: onnx.ModelProto, int8: onnx.ModelProto, images: np.ndarray
) -> dict[str, tuple[float, float]]:
    """Per quantized activation: (dB of its own rounding in the int8 file, dB against the
    fp32 model's tensor), from onnxruntime's qdq_loss_debug."""
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_signal_to_quantization_noice_ratio,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    with tempfile.TemporaryDirectory() as folder:
        collected = {}
        for label, model in (("fp32", fp32), ("int8", int8)):
            source, augmented = Path(folder) / f"{label}.onnx", Path(folder) / f"{label}-all.onnx"
            onnx.save(model, source)
            modify_model_output_intermediate_tensors(str(source), str(augmented))
            collected[label] = collect_activations(str(augmented), calibration_reader(images))
    matched = create_activation_matching(collected["int8"], collected["fp32"])
    relus = fused_relus(int8, fp32)
    out = {}
    for name, values in matched.items():
        before = values["pre_qdq"]
        if name in relus:  # the pair also clips at zero: its own noise is against ReLU(x)
            before = [np.maximum(x, 0) for x in before]
        against = values.get("float")
        out[name] = (
            compute_signal_to_quantization_noice_ratio(before, values["post_qdq"]),
            float("nan") if against is None else
            compute_signal_to_quantization_noice_ratio(against, values["post_qdq"]),
        )  # fmt: skip
    return out


def analyse(
    name: str, model: torch.nn.Module, config: TrialConfig, data: Dataset, test: Split,
    on_device: DeviceData, seed: int, folder: Path, calibration_counts: list[int],
) -> dict:  # fmt: skip
    resolution = config.train.test_resolution
    fp32 = prepared_fp32(model, resolution, data.channels)
    files = Files(folder, data, test, resolution)
    row: dict = {
        "network": name,
        "params": count_params(model),
        "torch": accuracy(predict(model, test, on_device, resolution), test.labels),
        "fp32": files.accuracy(fp32),
    }
    counts = sorted({CALIBRATION_IMAGES, *calibration_counts})
    images = {count: calibration_images(data, resolution, count, seed) for count in counts}
    int8 = to_int8(fp32, images[CALIBRATION_IMAGES])
    row["int8"] = files.accuracy(int8)
    row["int8_arithmetic"] = files.accuracy(int8, fused=False)
    full_range = to_int8(fp32, images[CALIBRATION_IMAGES], reduce_range=False)
    row["full_range"] = files.accuracy(full_range)
    row["full_range_arithmetic"] = files.accuracy(full_range, fused=False)
    started = time.perf_counter()
    try:
        tuned = quantization_aware_copy(model, on_device, config.train, seed)
    except TrainingDiverged as diverged:
        row["aware"] = row["aware_arithmetic"] = None
        row["aware_diverged"] = str(diverged)
    else:
        aware = to_int8(prepared_fp32(tuned.cpu(), resolution, data.channels),
                        images[CALIBRATION_IMAGES])  # fmt: skip
        row["aware"] = files.accuracy(aware)
        row["aware_arithmetic"] = files.accuracy(aware, fused=False)
    row["aware_seconds"] = time.perf_counter() - started
    kind_of = kinds(int8, fp32)
    present = [kind for kind in KINDS if kind == "weights" or kind in kind_of.values()]
    row["kinds"] = {}
    layers = sum(node.op_type in ("Conv", "Gemm") for node in fp32.graph.node)
    for kind in present:
        float_alone = unquantized(
            int8, fp32, lambda t, kind=kind: kind_of[t] == kind, weights_float=kind == "weights"
        )
        only = unquantized(
            int8, fp32, lambda t, kind=kind: kind_of[t] != kind, weights_float=kind != "weights"
        )
        row["kinds"][kind] = {
            "tensors": layers if kind == "weights" else sum(k == kind for k in kind_of.values()),
            "float": files.accuracy(float_alone, fused=False),
            "only": files.accuracy(only, fused=False),
        }
    row["calibration"] = {
        f"{method} {count}": files.accuracy(to_int8(fp32, images[count], method))
        for method in CALIBRATION_METHODS
        for count in calibration_counts
    }
    noise = signal_to_noise(fp32, int8, images[CALIBRATION_IMAGES])
    worst = sorted((v[0], t) for t, v in noise.items() if t in kind_of)[:WORST_TENSORS]
    row["worst"] = [
        {"tensor": t, "kind": kind_of[t], "own_db": db, "vs_fp32_db": noise[t][1]}
        for db, t in worst
    ]
    return row


def points(value: float, reference: float) -> str:
    return f"{100 * (value - reference):+.2f}"


def report(rows: list[dict], heading: str, command: str) -> str:
    lines = [heading, ""]
    lines += [
        "Each int8 file as onnxruntime runs it (fused integer kernels) and, in brackets, as "
        "its arithmetic says (fusion off, in float); points against the fp32 file.",
        "",
        "| network | params | train s | torch fp32 | fp32 file | int8, weights to +-127 "
        "| int8, weights to +-64 (the search's) | quantization-aware int8 | its s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:

        def both(key: str, r: dict = r) -> str:
            fused, arithmetic = r[key], r[f"{key}_arithmetic"]
            if fused is None:
                return "diverged"
            return (
                f"{fused:.2%} {points(fused, r['fp32'])} "
                f"({arithmetic:.2%} {points(arithmetic, r['fp32'])})"
            )

        lines.append(
            f"| {r['network']} | {r['params']:,} | {r['train_seconds']:.0f} | {r['torch']:.2%} "
            f"| {r['fp32']:.2%} | {both('full_range')} | {both('int8')} | {both('aware')} "
            f"| {r['aware_seconds']:.0f} |"
        )
    lines += [
        "",
        "The rest takes the search's file apart (weights to +-64).",
        "",
        "Points of the fp32 file each kind costs, each file computed as its arithmetic "
        "says: `float` = the int8 file with that kind back in float (points recovered, "
        "against the int8 file's arithmetic), `only` = only that kind quantized (points "
        "lost against the fp32 file); in brackets, the quantized activations of the kind "
        "(for weights, the layers).",
        "",
        "| network | " + " | ".join(KINDS) + " |",
        "|---|" + "---|" * len(KINDS),
    ]
    for r in rows:
        cells = []
        for kind in KINDS:
            k = r["kinds"].get(kind)
            cells.append(
                "-" if k is None else
                f"{points(k['float'], r['int8_arithmetic'])} / {points(k['only'], r['fp32'])} "
                f"({k['tensors']})"
            )  # fmt: skip
        lines.append(f"| {r['network']} | " + " | ".join(cells) + " |")
    methods = list(rows[0]["calibration"]) if rows else []
    lines += [
        "",
        "Calibration: points against the fp32 file, by method and training images.",
        "",
        "| network | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for r in rows:
        cells = [points(r["calibration"][m], r["fp32"]) for m in methods]
        lines.append(f"| {r['network']} | " + " | ".join(cells) + " |")
    lines += ["", f"The {WORST_TENSORS} noisiest quantized activations of each network "
              "(signal-to-quantization-noise ratio in dB: of its own rounding; in brackets, "
              "against the fp32 model's tensor):", ""]  # fmt: skip
    for r in rows:
        listed = ", ".join(
            f"`{w['tensor']}` {w['kind']} {w['own_db']:.1f} ({w['vs_fp32_db']:.1f})"
            for w in r["worst"]
        )
        lines.append(f"- {r['network']}: {listed}")
    return "\n".join(lines) + f"\n\n`{command}`\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED, help="the CIFAR-10 image folder")
    parser.add_argument("--models", type=Path, help="where trained networks are kept and found")
    parser.add_argument("--networks", nargs="+", help="names of networks (default: all)")
    parser.add_argument("--found", type=Path, default=FOUND, help="the found network's JSON")
    parser.add_argument("--subset", type=int, help="training images (default: all)")
    parser.add_argument("--test-subset", type=int, help="test images (default: all)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--calibration-images", type=int, nargs="+", default=list(CALIBRATION_COUNTS),
        help="training images for each calibration method to range on",
    )  # fmt: skip
    parser.add_argument("--results", type=Path, default=RESULTS / "int8_loss.md")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data} is not a folder; give --data the CIFAR-10 image folder")

    device = resolve_device(args.device)
    data = load_dataset(
        f"folder:{args.data.resolve()}", seed=0, subset=args.subset,
        cache_folder=Path(tempfile.gettempdir()) / "compsearch-bench" / CACHE_FOLDER,
    )  # fmt: skip
    test = data.test
    if args.test_subset is not None:  # a fixed draw: the folder is ordered by class
        index = spread_sample(args.test_subset, len(data.test))
        test = Split(data.test.images[index], data.test.labels[index])
    configs = network_configs(data, args.epochs, args.found)
    names = args.networks or list(configs)
    unknown = sorted(set(names) - set(configs))
    if unknown:
        raise SystemExit(f"unknown networks {unknown}; known: {', '.join(configs)}")
    on_device = DeviceData(data, device)
    models = args.models or Path(tempfile.gettempdir()) / "compsearch-bench" / "models"
    heading = (
        f"int8 loss, CIFAR-10 (JPEG copy), {len(data.train):,} training images, "
        f"{args.epochs} epochs, seed {args.seed}, {len(test):,} test images; every accuracy "
        f"of an ONNX file in onnxruntime; machine: {machine()}"
    )
    command = shlex.join(["python", "bench/int8_loss.py", *sys.argv[1:]])
    args.results.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        model, seconds = trained(name, configs[name], on_device, models, args.seed)
        with tempfile.TemporaryDirectory() as folder:
            row = analyse(
                name, model, configs[name], data, test, on_device, args.seed, Path(folder),
                args.calibration_images,
            )  # fmt: skip
        row["train_seconds"] = seconds
        rows.append(row)
        print(
            f"{name}: fp32 file {row['fp32']:.2%}, int8 {row['int8']:.2%} "
            f"({points(row['int8'], row['fp32'])})",
            flush=True,
        )
        args.results.write_text(report(rows, heading, command))
        args.results.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"written: {args.results}")


if __name__ == "__main__":
    main()
