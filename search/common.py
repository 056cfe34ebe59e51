"""What the command line needs before anything heavy is imported (no optuna, no torch):
the usage error, names and figures of studies and storages."""

from __future__ import annotations

from pathlib import Path

SAMPLERS = ("tpe", "nsga2", "gp", "random")
SETTINGS_KEY = "compsearch"  # study user attribute holding what the study was created with
HEARTBEAT_SECONDS = 10  # how often a worker tells the storage that its trial is alive
GRACE_HEARTBEATS = 6  # a running trial silent for this many heartbeats lost its worker


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
