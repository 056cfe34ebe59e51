"""Hard deployment budgets and how far a model is from meeting them."""

from __future__ import annotations

import math
from dataclasses import dataclass


def amount(value: float) -> str:
    """A figure as people write it: 2,000,000 rather than 2e+06; 300, 41.3, 0.25."""
    if value >= 1000 and float(value).is_integer():
        return f"{value:,.0f}"
    return f"{value:,.4g}" if value < 1000 else f"{value:,.1f}"


@dataclass(frozen=True)
class Budgets:
    params: float  # parameters of the deployed model
    size_kb: float  # bytes of the deployable ONNX file / 1000
    macs: float | None = None  # multiply-accumulates per image, when constrained
    # Peak activation memory of one inference / 1000 (spaces/memory.py), when constrained.
    ram_kb: float | None = None
    # Median single-image milliseconds of the file in onnxruntime on the machine that
    # searches, one thread (objectives/latency.py), when constrained.
    latency_ms: float | None = None

    def describe(self) -> str:
        """ "<= 2,000,000 params, <= 300 KB": the budgets as titles and messages state them."""
        text = f"<= {amount(self.params)} params, <= {amount(self.size_kb)} KB"
        text += f", <= {amount(self.macs)} MACs" if self.macs else ""
        text += f", <= {amount(self.ram_kb)} KB RAM" if self.ram_kb else ""
        return text + (f", <= {amount(self.latency_ms)} ms" if self.latency_ms else "")

    def __post_init__(self) -> None:
        for name, value in (
            ("params", self.params),
            ("size_kb", self.size_kb),
            ("macs", self.macs),
            ("ram_kb", self.ram_kb),
            ("latency_ms", self.latency_ms),
        ):
            if value is None and name in ("macs", "ram_kb", "latency_ms"):
                continue
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"budget {name} must be a finite number > 0, but got {value!r}")

    def constraints(
        self,
        params: float,
        size_kb: float,
        macs: float,
        ram_kb: float,
        latency_ms: float = math.nan,
    ) -> dict[str, float]:
        """Relative excess per budget: <= 0 where the budget holds (Optuna's convention).

        Relative rather than absolute so that the sampler weighs a 10% excess in bytes
        like a 10% excess in parameters.
        """
        values = {
            "params": params / self.params - 1.0,
            "size_kb": size_kb / self.size_kb - 1.0,
        }
        if self.macs is not None:
            values["macs"] = macs / self.macs - 1.0
        if self.ram_kb is not None:
            values["ram_kb"] = ram_kb / self.ram_kb - 1.0
        if self.latency_ms is not None:
            # Unknown (NaN) counts as within: a latency not yet measured or estimated.
            excess = latency_ms / self.latency_ms - 1.0
            values["latency_ms"] = 0.0 if math.isnan(excess) else excess
        return values

    def excess(
        self,
        params: float,
        size_kb: float,
        macs: float,
        ram_kb: float,
        latency_ms: float = math.nan,
    ) -> list[str]:
        """One phrase per broken budget, e.g. 'params 2,310,000 > 2,000,000'."""
        figures = {
            "params": params, "size_kb": size_kb, "macs": macs, "ram_kb": ram_kb,
            "latency_ms": latency_ms,
        }  # fmt: skip
        limits = {
            "params": self.params, "size_kb": self.size_kb, "macs": self.macs,
            "ram_kb": self.ram_kb, "latency_ms": self.latency_ms,
        }  # fmt: skip
        return [
            f"{name} {amount(figures[name])} > {amount(limits[name])}"
            for name, value in self.constraints(params, size_kb, macs, ram_kb, latency_ms).items()
            if value > 0
        ]

    def to_dict(self) -> dict[str, float | None]:
        return {
            "params": self.params, "size_kb": self.size_kb, "macs": self.macs,
            "ram_kb": self.ram_kb, "latency_ms": self.latency_ms,
        }  # fmt: skip
