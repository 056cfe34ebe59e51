"""The latency model: a config's single-image latency in onnxruntime on this machine,
predicted from its shapes before it trains, so that a search given --budget-latency does
not train a config that is clearly too slow.

Milliseconds are taken as linear in what one inference does (spaces/cost.py
latency_features: MACs, values written, graph nodes, a fixed cost), with non-negative
coefficients per precision (int8 and fp16 kernels cost otherwise than fp32), fitted by
non-negative least squares on relative errors to files of random configs of the space,
timed on this machine at the start of the run (objectives/latency.py). The model is
rough: widths that are multiples of 16 run much faster than the shapes alone say, so on
an AMX Xeon (bench/latency_noise.py) it over-predicted the anchors, whose widths are,
by 1.7 to 5.8 times, and erred by up to 62% on its own calibration files. A config is
therefore rejected only when even its prediction divided by LATENCY_SLACK (or by the
fit's worst error and LATENCY_MARGIN, when larger) breaks the budget: the measured
latency of each trained file decides the rest.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import torch
from scipy.optimize import nnls

from compsearch.objectives.compress import export
from compsearch.objectives.latency import file_latency_ms
from compsearch.search.cost import optuna_quiet
from compsearch.spaces.builder import build
from compsearch.spaces.config import TrainConfig, TrialConfig
from compsearch.spaces.cost import latency_features
from compsearch.spaces.estimate import channel_ratio, pruned_arch
from compsearch.spaces.space import SearchSpace, sample

LATENCY_PROBES = 6  # random configs of the space timed per precision at the start of a run
LATENCY_MARGIN = 0.25  # beyond the worst relative error of the fit: noise of a shared machine
# The least a prediction is divided by before it rejects: above the 5.8 times the model
# over-predicted an anchor by, fitted on random configs (measured on an AMX Xeon).
LATENCY_SLACK = 8.0
CALIBRATION_IMAGES = 8  # random images that range an int8 probe (its values do not matter)


@dataclass(frozen=True)
class LatencyModel:
    """Milliseconds per unit of each latency feature, per precision, and the worst
    relative error of the fit on the files it was fitted to."""

    coefficients: dict[str, tuple[float, ...]]
    worst_error: float

    def predict(self, config: TrialConfig) -> float:
        weights = self.coefficients[config.compress.precision]
        return float(np.dot(weights, latency_features(config)))

    def optimistic(self, config: TrialConfig) -> float:
        """The prediction lowered by LATENCY_SLACK, or by the fit's worst error and the
        margin when larger: a config whose optimistic latency breaks the budget is
        clearly too slow."""
        return self.predict(config) / max(LATENCY_SLACK, 1 + self.worst_error + LATENCY_MARGIN)

    @classmethod
    def fit(cls, observations: dict[str, list[tuple[tuple[float, ...], float]]]) -> LatencyModel:
        """`observations`: per precision, (features, measured milliseconds) pairs."""
        coefficients, errors = {}, []
        for precision, rows in observations.items():
            matrix = np.array([features for features, _ in rows], dtype=float)
            measured = np.array([ms for _, ms in rows], dtype=float)
            scale = np.abs(matrix).max(axis=0)
            scale[scale == 0] = 1.0
            solution, _ = nnls(matrix / scale / measured[:, None], np.ones(len(rows)))
            weights = solution / scale
            coefficients[precision] = tuple(float(w) for w in weights)
            errors += list(np.abs(matrix @ weights / measured - 1))
        return cls(coefficients, float(max(errors, default=math.inf)))


def calibrate_latency(
    space: SearchSpace, schedule: TrainConfig, seed: int, probes: int = LATENCY_PROBES
) -> LatencyModel:
    """Time the files of `probes` random configs of `space` at each of its precisions
    (untrained: latency does not depend on the weights' values) and fit the model."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    resolution, channels = space.test_resolution, space.in_channels
    rng = np.random.default_rng(seed)
    calibration = rng.random((CALIBRATION_IMAGES, channels, resolution, resolution))
    calibration = calibration.astype(np.float32)
    observations: dict[str, list[tuple[tuple[float, ...], float]]] = {}
    with optuna_quiet(), tempfile.TemporaryDirectory() as folder:
        for precision in space.precisions:
            rows = observations.setdefault(precision, [])
            for _ in range(probes):
                config = sample(study.ask(), space, schedule)
                compress = config.compress
                config = TrialConfig(
                    config.arch, config.train, type(compress)(precision, compress.prune_fraction)
                )
                arch = pruned_arch(config.arch, channel_ratio(config.arch, compress.prune_fraction))
                torch.manual_seed(seed)
                path = Path(folder) / "probe.onnx"
                export(build(arch).eval(), precision, resolution, channels, path, calibration)
                rows.append((latency_features(config), file_latency_ms(path, channels, resolution)))
    return LatencyModel.fit(observations)
