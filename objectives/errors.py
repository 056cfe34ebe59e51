"""The error of objectives/: data or a model file that cannot be used as given. Here, in a
module that imports nothing, so that the command line checks files without numpy."""

from __future__ import annotations


class DataError(ValueError):
    """The data cannot be used as given; the message says what is wrong and what to do."""


def one_line(error: BaseException) -> str:
    """An exception as one short line: messages from libraries may span lines or be empty."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."
