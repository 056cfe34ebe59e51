"""Pruning that removes channels, and ONNX export at fp32, fp16 or int8.

Everything reported about a model comes from the file written here.
"""

from __future__ import annotations

import io
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from compsearch.objectives.catalog import INPUT_NAME, OUTPUT_NAME
from compsearch.objectives.measure import count_params
from compsearch.spaces import blocks
from compsearch.spaces.blocks import aligned_width, get_block
from compsearch.spaces.builder import Network, read_widths
from compsearch.spaces.config import (
    PRUNE_CRITERIA,
    PRUNE_SCOPES,
    ArchConfig,
    CompressConfig,
    block_shapes,
    with_widths,
)
from compsearch.spaces.estimate import (
    GLOBAL_MAX_LAYER_RATIO,
    aligned_arch,
    channel_ratio,
    count_layers,
)

ONNX_OPSET = 17


GLOBAL_PRUNING_STEPS = 50  # global pruning removes channels in this many small steps


def importance(criterion: str):
    """torch-pruning's importance for a criterion of PRUNE_CRITERIA."""
    import torch_pruning as tp

    if criterion == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if criterion == "bn_scale":

        class ScaleOrMagnitude(tp.importance.BNScaleImportance):
            """Batch-norm scales; for a group with no batch norm (a squeeze-and-excitation
            layer), the L2 norm of its weights, so every group local pruning counts on
            is pruned."""

            def __call__(self, group):
                scores = super().__call__(group)
                return scores if scores is not None else magnitude(group)

        magnitude = tp.importance.GroupMagnitudeImportance(p=2)
        return ScaleOrMagnitude()
    if criterion == "taylor":
        return tp.importance.GroupTaylorImportance()
    raise ValueError(f"unknown pruning criterion {criterion!r}; valid: {', '.join(PRUNE_CRITERIA)}")


def prune(
    model: Network,
    arch: ArchConfig,
    compress: CompressConfig,
    example: torch.Tensor,
    loss: Callable[[nn.Module], torch.Tensor] | None = None,
) -> ArchConfig:
    """Remove whole channels until `compress.prune_fraction` of the parameters are gone,
    in place, and return the architecture with the widths that remain, from which the
    model rebuilds.

    Channels are removed physically (torch-pruning), ranked by `compress.prune_criterion`:
    "taylor" needs `loss(model)`, a loss on training images whose gradients it reads.
    Local pruning removes the same share of every layer's channels, the share that
    `channel_ratio` finds, so the estimates before training are exact. Global pruning
    ranks channels across layers and removes them in small steps until the parameters
    are down to the target (or as far as it can go); no layer loses more than
    GLOBAL_MAX_LAYER_RATIO of its channels,
    and widths the config ties but torch-pruning would prune apart stay whole (see
    `Block.fixed_in_global_pruning`). Either way, where CHANNEL_ALIGNMENT is above 1 (a
    benchmark's setting), every width is then rounded down to a multiple of it
    (`align_channels`).
    """
    fraction = compress.prune_fraction
    if fraction <= 0:
        return arch
    if compress.prune_scope not in PRUNE_SCOPES:
        raise ValueError(
            f"unknown pruning scope {compress.prune_scope!r}; valid: {', '.join(PRUNE_SCOPES)}"
        )
    import torch_pruning as tp

    ranking = importance(compress.prune_criterion)
    if compress.prune_criterion == "taylor":
        if loss is None:
            raise ValueError("Taylor pruning needs a loss to take gradients of")
        model.zero_grad(set_to_none=True)
        loss(model).backward()
    if compress.prune_scope == "local":
        tp.pruner.BasePruner(
            model,
            example,
            importance=ranking,
            pruning_ratio=channel_ratio(arch, fraction),
            ignored_layers=[model.classifier],
        ).step()
    else:
        fixed = [
            layer
            for (stage, _), block in zip(block_shapes(arch), model.blocks, strict=True)
            for layer in get_block(stage.block).fixed_in_global_pruning(block, stage.depth)
        ]
        target = (1 - fraction) * count_params(model)
        pruner = tp.pruner.BasePruner(
            model,
            example,
            importance=ranking,
            global_pruning=True,
            pruning_ratio=GLOBAL_MAX_LAYER_RATIO,
            max_pruning_ratio=GLOBAL_MAX_LAYER_RATIO,
            iterative_steps=GLOBAL_PRUNING_STEPS,
            ignored_layers=[model.classifier, *fixed],
        )
        for _ in range(GLOBAL_PRUNING_STEPS):
            pruner.step()
            # Stop as soon as the widths, once aligned below, are few enough.
            stem_width, stage_widths = read_widths(model, arch)
            aligned = aligned_arch(with_widths(arch, stem_width, stage_widths))
            if count_layers(aligned, 1).params <= target:
                break
    align_channels(model, example, ranking, ignored_layers=[model.classifier])
    model.zero_grad(set_to_none=True)
    stem_width, stage_widths = read_widths(model, arch)
    return with_widths(arch, stem_width, stage_widths)


def splits_channels(module: nn.Module) -> bool:
    """A grouped convolution that is not depthwise: pruning must keep its groups equal."""
    return isinstance(module, nn.Conv2d) and 1 < module.groups < module.in_channels


def align_channels(
    model: nn.Module, example: torch.Tensor, ranking, ignored_layers: list[nn.Module]
) -> None:
    """Prune every channel group of `model` further, by the least important channels, down
    to `aligned_width` (a multiple of CHANNEL_ALIGNMENT where it is above it), in place;
    groups that a grouped convolution splits stay as they are (`kept_channels` mirrors
    this). Nothing to do at the default alignment of 1."""
    if blocks.CHANNEL_ALIGNMENT <= 1:
        return
    import torch_pruning as tp

    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    for group in graph.get_all_groups(ignored_layers=ignored_layers, root_module_types=[nn.Conv2d]):
        if any(splits_channels(item.dep.target.module) for item in group):
            continue
        channels = len(group[0].idxs)
        extra = channels - aligned_width(channels)
        if extra > 0:
            scores = ranking(group)
            group.prune(idxs=torch.argsort(scores)[:extra].tolist())


class FlipAveraged(nn.Module):
    """The mean of a model's logits on the image and on its mirror image: horizontal-flip
    test-time augmentation inside the deployed file, which costs twice the model's MACs
    (counted as such, since the model runs twice).

    Both go through the model as one batch, so the file holds its weights once: two calls
    would export each batch-norm-folded convolution twice and double the file."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        both = self.model(torch.cat([x, torch.flip(x, dims=(3,))]))
        original, mirrored = both.chunk(2)
        return 0.5 * (original + mirrored)


def export_fp32(model: nn.Module, resolution: int, channels: int) -> onnx.ModelProto:
    """The eval-mode model as ONNX, batch-norms folded, with a dynamic batch dimension."""
    model = model.eval()
    example = torch.zeros(1, channels, resolution, resolution)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The TorchScript exporter: it folds batch norms and takes a tenth of a second,
        # where the dynamo exporter takes seconds and keeps them.
        torch.onnx.export(
            model,
            (example,),
            buffer,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    return onnx.load_from_string(buffer.getvalue())


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and arithmetic; float32 input and output so callers need not change."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_float_to_float16(model, keep_io_types=True)


# onnxruntime's ways of choosing an activation's range from the calibration images: our
# name -> its CalibrationMethod member.
CALIBRATION_METHODS = {
    "minmax": "MinMax",
    "percentile": "Percentile",
    "entropy": "Entropy",
    "distribution": "Distribution",
}


def calibration_reader(images: np.ndarray):
    """onnxruntime's reader of `images` as the model's input, in batches of about 64."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(np.array_split(images, max(1, len(images) // 64)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    return Reader()


# Weights round to 129 levels (-64..64) rather than 255: onnxruntime's integer
# convolution on x86 without VNNI multiplies uint8 activations by int8 weights with
# VPMADDUBSW, whose sums of two products saturate at 32,767 (255 x 127 x 2 does not
# fit; 255 x 64 x 2 does). With full-range weights, a ResNet-8 on CIFAR-10 measured
# 1.98 points below its fp32 file there and 0.11 below with onnxruntime's fusion off
# (the same file's arithmetic in float); with these weights, 0.08 below, fused or not
# (bench/int8_loss.py). Other runtimes read the same file: the weights are int8.
WEIGHT_LEVELS = 64  # the largest |int8 weight|; onnxruntime's "reduce_range"


def to_int8(
    model: onnx.ModelProto,
    calibration: np.ndarray,
    method: str = "minmax",
    reduce_range: bool = True,
) -> onnx.ModelProto:
    """Static int8 quantization: per-channel symmetric int8 weights (to +-WEIGHT_LEVELS,
    or +-127 without `reduce_range`), uint8 activations over ranges calibrated on
    `calibration` by `method` (CALIBRATION_METHODS: onnxruntime's min-max, percentile,
    entropy or distribution).

    QDQ format: onnxruntime fuses each DequantizeLinear-op-QuantizeLinear into an integer
    kernel, and other runtimes read the same file.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if method not in CALIBRATION_METHODS:
        raise ValueError(
            f"unknown calibration method {method!r}; valid: {', '.join(CALIBRATION_METHODS)}"
        )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "fp32.onnx"
        prepared = Path(folder) / "prepared.onnx"
        target = Path(folder) / "int8.onnx"
        onnx.save(model, source)
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(target),
            calibration_reader(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            reduce_range=reduce_range,
            calibrate_method=CalibrationMethod[CALIBRATION_METHODS[method]],
        )
        return onnx.load(target)


def compact_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """Short names for every internal tensor, no node names or doc strings.

    The exporters name tensors after module paths ("/blocks/blocks.0/conv1/conv1.0/
    Conv_output_0_QuantizeLinear"), which can be half of a small int8 file. Input and
    output names stay; nothing that is computed changes.
    """
    graph = model.graph
    keep = {value.name for value in graph.input} | {value.name for value in graph.output}
    renamed: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in renamed:
            renamed[name] = format(len(renamed), "x")
        return renamed[name]

    sort_topologically(graph)
    for tensor in graph.initializer:
        tensor.name = short(tensor.name)
        tensor.doc_string = ""
    for node in graph.node:
        node.name = ""
        node.doc_string = ""
        node.input[:] = [short(name) for name in node.input]
        node.output[:] = [short(name) for name in node.output]
    # Shapes of intermediate tensors are recomputed by runtimes; they only add bytes.
    del graph.value_info[:]
    graph.doc_string = ""
    model.doc_string = ""
    del model.metadata_props[:]
    model.producer_name = "compsearch"
    model.producer_version = ""
    onnx.checker.check_model(model)
    return model


def sort_topologically(graph: onnx.GraphProto) -> None:
    """Order nodes so each follows its inputs' producers (the fp16 converter appends its
    Cast nodes at the end, which onnxruntime accepts but the ONNX checker does not)."""
    available = {value.name for value in graph.input} | {t.name for t in graph.initializer}
    available.add("")  # an omitted optional input
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [node for node in pending if all(name in available for name in node.input)]
        if not ready:
            raise ValueError("the ONNX graph has a cycle or an input that nothing produces")
        for node in ready:
            available.update(node.output)
        ordered.extend(ready)
        pending = [node for node in pending if node not in ready]
    copies = [onnx.NodeProto.FromString(node.SerializeToString()) for node in ordered]
    del graph.node[:]
    graph.node.extend(copies)


def export(
    model: nn.Module,
    precision: str,
    resolution: int,
    channels: int,
    path: Path,
    calibration: np.ndarray | None = None,
) -> Path:
    """Write the deployable ONNX file for `precision` to `path`."""
    exported = export_fp32(model, resolution, channels)
    if precision == "fp16":
        exported = to_fp16(exported)
    elif precision == "int8":
        if calibration is None:
            raise ValueError("int8 export needs calibration images")
        exported = to_int8(exported, calibration)
    elif precision != "fp32":
        raise ValueError(f"unknown precision {precision!r}; valid: fp32, fp16, int8")
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(compact_names(exported), path)
    return path
