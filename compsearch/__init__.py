"""compsearch: find the most accurate image classifier that fits hard deployment budgets."""

from __future__ import annotations

__version__ = "0.1.0"
