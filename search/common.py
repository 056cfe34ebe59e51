"""Constants of search/ and the usage error: what the command line needs before anything
heavy is imported (no optuna, no torch)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

# The samplers --sampler names, each made from `optuna.samplers` and a seed. TPE keeps one
# density per parameter: on bench/search_efficiency.py it reached a better front than
# multivariate TPE, whose joint density needs far more trials in a space of some 35
# parameters; constant_liar keeps parallel workers from proposing the same config.
SAMPLERS: dict[str, Callable[[ModuleType, int], Any]] = {
    "tpe": lambda samplers, seed: samplers.TPESampler(constant_liar=True, seed=seed),
    "nsga2": lambda samplers, seed: samplers.NSGAIISampler(seed=seed),
    "gp": lambda samplers, seed: samplers.GPSampler(seed=seed),
    "random": lambda samplers, seed: samplers.RandomSampler(seed=seed),
}
HEARTBEAT_SECONDS = 10  # how often a worker tells the storage that its trial is alive
GRACE_HEARTBEATS = 6  # a running trial silent for this many heartbeats lost its worker
DEFAULT_OUT = Path("runs")
DEFAULT_TRIALS = 40
# A run's default --time: the default digits search, results included, within five
# minutes on a two-core machine without AVX-512 (see the README).
DEFAULT_TIME = 4 * 60.0
DEFAULT_EPOCHS = 12
# Fidelities of the successive halving (search/fidelity.py). One by default: on CIFAR-10
# the lower rungs ranked configs for a fixed-time export poorly (Kendall's tau +0.47,
# bench/fidelity_ranking.py), and the default digits run with three rungs ended with a
# worse front than with one (README, "Other figures"). `--rungs 3` turns them on.
DEFAULT_RUNGS = 1
# What a rung of the ladder counts (search/fidelity.py): epochs x images, or predicted
# training seconds, equal for every config at a rung.
FIDELITIES = ("epochs", "seconds")
DEFAULT_FIDELITY = "epochs"
EXPORT_EPOCH_FACTOR = 3  # an export trains this many times a trial's epochs by default
SPACE_FILE = "space.toml"  # the space searched, beside the study
WORKER_SEED_STRIDE = 1009  # sampler seeds of workers started together differ by this
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(ValueError):
    """The user's input cannot work; the message says what is wrong and what to do."""


def storage_url(storage: str | None, folder: Path) -> str:
    return storage if storage else f"sqlite:///{folder / 'study.db'}"


def redact(url: str) -> str:
    """The URL with any password replaced, fit to print or store."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    if ":" in credentials:
        credentials = credentials.split(":", 1)[0] + ":***"
    return f"{scheme}://{credentials}@{host}"


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
