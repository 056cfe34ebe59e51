"""Single-image latency of a deployable file in onnxruntime on this machine: one thread,
sequential execution, after warm-up; the median of repeated runs on one random image.

One thread, because a microcontroller or a small phone's core runs a model alone, and
because on a shared machine a second thread measures the neighbours more than the model.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

WARMUP_RUNS = 10  # unmeasured: allocations, caches, onnxruntime's first-run work
MIN_RUNS = 20
MAX_RUNS = 500
MEASURE_SECONDS = 0.3  # runs until this much time has passed (between MIN and MAX_RUNS)


def file_latency_ms(path: Path, channels: int, resolution: int) -> float:
    """Median milliseconds of one inference of one image by the ONNX file at `path`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    image = np.random.default_rng(0).standard_normal((1, channels, resolution, resolution))
    feed = {name: image.astype(np.float32)}
    for _ in range(WARMUP_RUNS):
        session.run(None, feed)
    times = []
    started = time.perf_counter()
    while len(times) < MIN_RUNS or (
        len(times) < MAX_RUNS and time.perf_counter() - started < MEASURE_SECONDS
    ):
        tick = time.perf_counter_ns()
        session.run(None, feed)
        times.append(time.perf_counter_ns() - tick)
    return statistics.median(times) / 1e6
