"""The trainer: whole-tensor data on the device, batch augmentation there, FixRes phases.

The training and validation images live on the training device as uint8 tensors for the
whole run (`DeviceData`, made once, shared by every trial). An epoch draws all its random
numbers at once, then each batch is cropped, flipped, cut out, converted and normalized
on the device in a few tensor operations: no per-image Python, no DataLoader.

One phase trains at one resolution with a warm-up then a linear decay of the learning
rate (a one-cycle schedule) and Nesterov SGD on label-smoothed cross-entropy, optionally
with a teacher's softened outputs. A trial runs a long phase at the low training
resolution, prunes, then a short phase at the test resolution, which both recovers from
pruning and adapts the network to the resolution it is deployed at (FixRes); the
batch-norm statistics are then recalibrated on unaugmented images at that resolution.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from compsearch.objectives.data import Dataset, Split, normalize
from compsearch.spaces.config import TrainConfig
from compsearch.spaces.layers import Residual

EpochCallback = Callable[[int, int, int], None]  # (epoch done, epochs in phase, resolution)

MOMENTUM = 0.9  # SGD momentum (Nesterov)
WARMUP_FRACTION = 0.15  # of a phase's steps spent ramping the learning rate up
EVAL_BATCH_SIZE = 1024  # images per forward pass when predicting on a GPU
# On a CPU small batches stay in cache: predicting CIFAR-10 with a 263k-parameter ResNet
# ran at 1,780 images/s in batches of 64 against 1,045 in batches of 1,024 (2 cores).
CPU_EVAL_BATCH_SIZE = 64
RECALIBRATION_IMAGES = 4096  # unaugmented training images that re-estimate BN statistics


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


OPTIMIZERS = ("sgd", "adamw")
# AdamW's peak learning rate and decoupled weight decay against the schedule's SGD ones:
# a schedule's SGD learning rate of 0.1 becomes 2e-3, its L2 of 5e-4 a decay of 0.05.
ADAMW_LEARNING_RATE_FACTOR = 0.02
ADAMW_WEIGHT_DECAY_FACTOR = 100.0


@dataclass(frozen=True)
class Recipe:
    """Training ingredients beyond the schedule; the defaults are the trainer as it was
    before bench/recipe.py measured each one."""

    optimizer: str = "sgd"  # "sgd" (Nesterov) or "adamw"
    # Weight decay on batch-norm scales and shifts and on biases too, not only on the
    # weights of convolutions and linear layers.
    decay_norms: bool = True
    # An exponential moving average of the weights (and batch-norm buffers), its horizon
    # this fraction of the phase's steps, replaces the weights at the end of each phase;
    # 0: none.
    average_fraction: float = 0.0
    # Zero the scale of the last batch norm of every residual branch, so that each
    # residual block starts as its shortcut (Goyal et al., 2017).
    zero_init_residual: bool = False
    # Set the stem convolution's filters to the leading principal directions of the
    # training images' patches, whitened (as airbench does), before training.
    whiten_stem: bool = False
    # Largest random translation, as a share of the image side (zero fill); 0: none.
    # None by default, as trials train: on ResNet-8, CIFAR-10, 10 epochs of 40,000 images,
    # no translation gained 4.03 points (3 seeds, each +3.45 or more) over an eighth of
    # the side (bench/results/recipe_augment_full.md); at such short schedules small
    # networks underfit, and translated images only make the task harder. Over 30 epochs
    # an eighth gained 1.53 (bench/results/recipe_translate_30epochs.md): an export of
    # that many epochs translates (export_recipe).
    translation: float = 0.0
    # Flip each image in every other epoch, starting from a random half (as airbench
    # does), instead of drawing each epoch's flips anew.
    alternating_flip: bool = False

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}"
            )
        if not 0.0 <= self.average_fraction < 1.0:
            raise ValueError(f"average_fraction must lie in [0, 1), got {self.average_fraction}")
        if not 0.0 <= self.translation < 0.5:
            raise ValueError(f"translation must lie in [0, 0.5), got {self.translation}")


# The recipe of a long training (an export's): translating by up to an eighth of the side.
EXPORT_RECIPE = Recipe(translation=1 / 8)
# From this many epochs on translation pays. ResNet-8, CIFAR-10, 10,000 images, one seed
# each: -3.35 points at 15 epochs, -0.76 at 20, +1.53 at 30
# (bench/results/recipe_translate_{15,20,30}epochs.md); at 10 epochs of 40,000 images
# -4.03. 30 is the shortest schedule measured to gain.
TRANSLATION_FROM_EPOCHS = 30


def export_recipe(epochs: int) -> Recipe:
    """The recipe of a training of `epochs` epochs in all: translated from
    TRANSLATION_FROM_EPOCHS epochs on, as trials otherwise."""
    return EXPORT_RECIPE if epochs >= TRANSLATION_FROM_EPOCHS else Recipe()


@dataclass(frozen=True)
class Phase:
    resolution: int  # pixels
    epochs: int
    peak_learning_rate: float
    warmup_fraction: float  # of the phase's steps spent ramping the learning rate up
    batch_size: int  # images
    weight_decay: float  # L2 coefficient, applied by SGD
    label_smoothing: float  # probability mass spread over the other classes
    cutout: int = 0  # side in pixels of the square zeroed at a random place; 0: none
    recipe: Recipe = field(default_factory=Recipe)

    @classmethod
    def of(
        cls, schedule: TrainConfig, resolution: int, epochs: int, recipe: Recipe | None = None
    ) -> Phase:
        """A phase with `schedule`'s optimizer settings, warming up for WARMUP_FRACTION."""
        return cls(
            resolution=resolution,
            epochs=epochs,
            peak_learning_rate=schedule.learning_rate,
            warmup_fraction=WARMUP_FRACTION,
            batch_size=schedule.batch_size,
            weight_decay=schedule.weight_decay,
            label_smoothing=schedule.label_smoothing,
            cutout=schedule.cutout,
            recipe=recipe or Recipe(),
        )


@dataclass(frozen=True)
class Distillation:
    """How a student learns from a teacher's softened outputs (Hinton et al., 2015)."""

    teacher: nn.Module  # on the training device, never trained here
    weight: float  # share of the loss from the teacher; the rest from the labels
    temperature: float  # softens both distributions; the loss is scaled by its square
    # Pixels: the teacher sees each augmented batch at this resolution, whatever
    # resolution the student trains at, so it teaches at its best.
    resolution: int


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the hardware multiplies in it: CUDA, and CPUs with AMX or AVX-512 bf16.

    Elsewhere bf16 is emulated and slower than fp32 (measured ten times slower for a
    ResNet-20 step on an AVX2-only CPU), so training stays in fp32.
    """
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu":
        native = (
            getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
            or getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        )
        return torch.bfloat16 if native else None
    return None


class DeviceData:
    """A dataset's training and validation images as uint8 tensors on the training device,
    with the statistics that normalize them; made once per run and shared by its trials."""

    def __init__(
        self, data: Dataset, device: torch.device | str, mixed_precision: bool = True
    ) -> None:
        self.device = torch.device(device)
        self.train = data.train.to(self.device)
        self.val = data.val.to(self.device)
        # Made once here, not per batch.
        self.mean = torch.tensor(data.mean, device=self.device)
        self.std = torch.tensor(data.std, device=self.device)
        self.flip = data.flip
        self.resolution = data.resolution
        self.channels = data.channels
        self.autocast = autocast_dtype(self.device) if mixed_precision else None

    def subset(self, count: int) -> DeviceData:
        """The same data with `count` of its training images, a fixed random draw: a
        smaller subset lies within a larger one. Itself when `count` covers them all."""
        if count >= len(self.train):
            return self
        view = copy.copy(self)
        index = spread_sample(count, len(self.train)).to(self.device)
        view.train = Split(self.train.images[index], self.train.labels[index])
        return view

    def inputs(self, images: torch.Tensor, resolution: int) -> torch.Tensor:
        """uint8 (N, C, H, W) on the device to normalized float at `resolution`,
        channels_last."""
        return normalize(images, self.mean, self.std, resolution)

    def autocast_context(self) -> torch.autocast:
        return torch.autocast(
            self.device.type, dtype=self.autocast or torch.bfloat16, enabled=bool(self.autocast)
        )


def translation_pad(resolution: int, share: float) -> int:
    """Pixels of random translation: `share` of the image side, rounded down but at least
    one pixel (an eighth: 4 px at 32 px, 1 px at 8 px); none when `share` is 0."""
    return max(1, int(resolution * share)) if share > 0 else 0


@dataclass(frozen=True)
class EpochDraws:
    """Every random choice of one epoch's augmentation, drawn at once on the CPU generator
    (so a seed gives the same epoch on any device) and moved to the device in one copy."""

    order: torch.Tensor  # permutation of the training images
    shift_y: torch.Tensor  # per image, 0 .. 2 * pad
    shift_x: torch.Tensor
    flip: torch.Tensor  # per image, bool
    cutout_y: torch.Tensor  # per image, top-left corner of the cut-out square
    cutout_x: torch.Tensor

    @classmethod
    def draw(
        cls, count: int, pad: int, side: int, cutout: int, generator: torch.Generator
    ) -> EpochDraws:
        order = torch.randperm(count, generator=generator)
        shifts = torch.randint(0, 2 * pad + 1, (2, count), generator=generator)
        flip = torch.rand(count, generator=generator) < 0.5
        # The square may hang over the border, as in DeVries & Taylor (2017).
        corners = torch.randint(
            -cutout // 2, side - cutout // 2 + 1, (2, count), generator=generator
        )
        return cls(order, shifts[0], shifts[1], flip, corners[0], corners[1])

    def to(self, device: torch.device) -> EpochDraws:
        return EpochDraws(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def augment(
    images: torch.Tensor,
    draws: EpochDraws,
    positions: slice,
    pad: int,
    flip: bool,
    cutout: int,
) -> torch.Tensor:
    """Translate by up to `pad` pixels (zero fill), flip if `flip`, and zero a `cutout`
    square: a whole uint8 batch at once, on its device. `positions` are the batch's places
    in the epoch, which pick its rows of `draws`."""
    n, c, h, w = images.shape
    device = images.device
    out = images
    if pad > 0:
        padded = F.pad(images, (pad, pad, pad, pad))
        rows = (draws.shift_y[positions, None] + torch.arange(h, device=device))[:, None, :, None]
        cols = (draws.shift_x[positions, None] + torch.arange(w, device=device))[:, None, None, :]
        batch = torch.arange(n, device=device)[:, None, None, None]
        channel = torch.arange(c, device=device)[None, :, None, None]
        out = padded[batch, channel, rows, cols]
    if flip:
        out = torch.where(draws.flip[positions, None, None, None], out.flip(3), out)
    if cutout > 0:
        y = torch.arange(h, device=device)[None, :] - draws.cutout_y[positions, None]
        x = torch.arange(w, device=device)[None, :] - draws.cutout_x[positions, None]
        inside_y = (y >= 0) & (y < cutout)
        inside_x = (x >= 0) & (x < cutout)
        hole = inside_y[:, :, None] & inside_x[:, None, :]
        out = out.masked_fill(hole[:, None], 0)
    return out


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL divergence from the teacher's softened distribution to the student's, scaled by
    the temperature squared so its gradients keep their size as the temperature grows."""
    return (
        F.kl_div(
            F.log_softmax(student.float() / temperature, dim=1),
            F.log_softmax(teacher.float() / temperature, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        * temperature**2
    )


def fit(
    model: nn.Module,
    data: DeviceData,
    phase: Phase,
    generator: torch.Generator,
    on_epoch: EpochCallback | None = None,
    distillation: Distillation | None = None,
) -> float:
    """Train `model` in place for one phase; returns the mean loss of the last epoch."""
    train = data.train
    steps_per_epoch = math.ceil(len(train) / phase.batch_size)
    total_steps = max(1, phase.epochs * steps_per_epoch)
    warmup_steps = max(1, round(phase.warmup_fraction * total_steps))
    optimizer = make_optimizer(model, phase)
    average = weight_average(model, phase.recipe.average_fraction, total_steps)

    def learning_rate_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor)
    pad = translation_pad(data.resolution, phase.recipe.translation)
    # Alternating flips: each image's flip in even epochs, drawn once per phase (the first
    # epoch's draws, read by image rather than by place); odd epochs flip the others.
    image_flips: torch.Tensor | None = None
    if distillation is not None:
        distillation.teacher.eval()
    model.train()
    mean_loss = float("nan")
    for epoch in range(phase.epochs):
        draws = EpochDraws.draw(len(train), pad, data.resolution, phase.cutout, generator)
        if phase.recipe.alternating_flip:
            if image_flips is None:
                image_flips = draws.flip
            flips = image_flips[draws.order] ^ bool(epoch % 2)
            draws = dataclasses.replace(draws, flip=flips)
        draws = draws.to(data.device)
        loss_sum = torch.zeros((), device=data.device)
        for start in range(0, len(train), phase.batch_size):
            batch = slice(start, start + phase.batch_size)
            index = draws.order[batch]
            images = augment(train.images[index], draws, batch, pad, data.flip, phase.cutout)
            x = data.inputs(images, phase.resolution)
            labels = train.labels[index]
            with data.autocast_context():
                logits = model(x)
                loss = F.cross_entropy(
                    logits.float(), labels, label_smoothing=phase.label_smoothing
                )
                if distillation is not None:
                    with torch.no_grad():
                        seen = (
                            x
                            if distillation.resolution == phase.resolution
                            else data.inputs(images, distillation.resolution)
                        )
                        taught = distillation.teacher(seen)
                    loss = (1 - distillation.weight) * loss + distillation.weight * (
                        distillation_loss(logits, taught, distillation.temperature)
                    )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if average is not None:
                average.update_parameters(model)
            loss_sum += loss.detach() * len(labels)
        mean_loss = loss_sum.item() / len(train)
        if not math.isfinite(mean_loss):
            raise TrainingDiverged(
                f"training loss became {mean_loss} in epoch {epoch + 1} at "
                f"{phase.resolution} px (learning rate {phase.peak_learning_rate})"
            )
        if on_epoch is not None:
            on_epoch(epoch + 1, phase.epochs, phase.resolution)
    if average is not None:
        model.load_state_dict(average.module.state_dict())
    model.eval()
    return mean_loss


def make_optimizer(model: nn.Module, phase: Phase) -> torch.optim.Optimizer:
    """The phase's optimizer over `model`'s parameters; without `decay_norms`, batch-norm
    parameters and biases (every parameter of one dimension) are not decayed."""
    recipe = phase.recipe
    adamw = recipe.optimizer == "adamw"
    decay = phase.weight_decay * (ADAMW_WEIGHT_DECAY_FACTOR if adamw else 1.0)
    parameters = [p for p in model.parameters() if p.requires_grad]
    if recipe.decay_norms:
        groups = [{"params": parameters, "weight_decay": decay}]
    else:
        groups = [
            {"params": [p for p in parameters if p.ndim > 1], "weight_decay": decay},
            {"params": [p for p in parameters if p.ndim <= 1], "weight_decay": 0.0},
        ]
    if adamw:
        return torch.optim.AdamW(groups, lr=phase.peak_learning_rate * ADAMW_LEARNING_RATE_FACTOR)
    return torch.optim.SGD(groups, lr=phase.peak_learning_rate, momentum=MOMENTUM, nesterov=True)


def weight_average(
    model: nn.Module, fraction: float, total_steps: int
) -> torch.optim.swa_utils.AveragedModel | None:
    """An exponential moving average of `model`'s weights and buffers whose horizon is
    `fraction` of the phase's steps (decay 1 - 1 / horizon); None for a fraction of 0."""
    if fraction <= 0:
        return None
    horizon = max(1.0, fraction * total_steps)
    return torch.optim.swa_utils.AveragedModel(
        model,
        multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(1.0 - 1.0 / horizon),
        use_buffers=True,
    )


def zero_init_residual(model: nn.Module) -> int:
    """Zero the scale of the last batch norm in every residual branch of `model`; the
    number of branches changed."""
    changed = 0
    for module in model.modules():
        if not isinstance(module, Residual):
            continue
        norms = [m for m in module.branch.modules() if isinstance(m, nn.BatchNorm2d)]
        if norms:
            nn.init.zeros_(norms[-1].weight)
            changed += 1
    return changed


WHITENING_IMAGES = 5000  # training images whose patches set the stem's filters
WHITENING_EPSILON = 5e-4  # added to each eigenvalue before its inverse square root
WHITENING_BATCH = 500  # images unfolded into patches at a time


@torch.no_grad()
def whiten_stem(model: nn.Module, data: DeviceData, resolution: int) -> int:
    """Set the stem convolution's filters to the principal directions of the training
    images' patches of its size, each scaled by the inverse square root of its variance
    (the largest first, then their negatives, as airbench does); filters beyond twice the
    patch's dimension keep their initialization. Returns the filters set."""
    conv = model.stem[0][0]
    if conv.groups != 1:
        return 0
    kernel = conv.kernel_size[0]
    size = conv.in_channels * kernel**2
    index = spread_sample(WHITENING_IMAGES, len(data.train)).to(data.device)
    total = torch.zeros(size, dtype=torch.float64, device=data.device)
    products = torch.zeros(size, size, dtype=torch.float64, device=data.device)
    count = 0
    for start in range(0, len(index), WHITENING_BATCH):  # patches of all at once: ~0.5 GB
        x = data.inputs(data.train.images[index[start : start + WHITENING_BATCH]], resolution)
        patches = F.unfold(x.float(), kernel).transpose(1, 2).reshape(-1, size).double()
        total += patches.sum(0)
        products += patches.T @ patches
        count += len(patches)
    mean = total / count
    covariance = products / count - torch.outer(mean, mean)
    values, vectors = torch.linalg.eigh(covariance)
    order = values.argsort(descending=True)
    filters = (vectors[:, order] / (values[order] + WHITENING_EPSILON).sqrt()).T.float()
    filters = torch.cat([filters, -filters])[: conv.out_channels]
    conv.weight[: len(filters)] = filters.reshape(len(filters), *conv.weight.shape[1:]).to(
        conv.weight.device, conv.weight.dtype
    )
    return len(filters)


def spread_sample(count: int, total: int) -> torch.Tensor:
    """`count` of `total` training positions, drawn at random with a fixed seed. The
    training split may be ordered by class (image folders are read class by class), so
    its first images can all be of one class."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(0))[:count]


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    data: DeviceData,
    resolution: int,
    batch_size: int,
    images: int = RECALIBRATION_IMAGES,
) -> None:
    """Re-estimate every batch-norm layer's running statistics from unaugmented training
    images at `resolution`: what the deployed model sees, rather than the padded crops it
    was trained on (FixRes, Touvron et al., 2019)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over every batch
    model.train()
    index = spread_sample(images, len(data.train)).to(data.device)
    for start in range(0, len(index), batch_size):
        model(data.inputs(data.train.images[index[start : start + batch_size]], resolution))
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    model.eval()


@torch.no_grad()
def predict(model: nn.Module, split: Split, data: DeviceData, resolution: int) -> torch.Tensor:
    """Predicted class of every image in `split` (torch, fp32, eval mode, on `data`'s
    device)."""
    model.eval()
    out = []
    batch_size = CPU_EVAL_BATCH_SIZE if data.device.type == "cpu" else EVAL_BATCH_SIZE
    for start in range(0, len(split), batch_size):
        images = split.images[start : start + batch_size].to(data.device)
        out.append(model(data.inputs(images, resolution)).argmax(1))
    return torch.cat(out)


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    return (predictions == labels.to(predictions.device)).float().mean().item()
