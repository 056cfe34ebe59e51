"""compsearch: find the most accurate image classifier that fits hard deployment budgets.

    import compsearch
    summary = compsearch.run(budget_params=2e6, budget_kb=300, dataset="cifar10")
    exported = compsearch.export("best")

`run`, `export`, `show` and `plot` are those of compsearch.search.api, loaded on first
use so that `import compsearch` (and the command line's checks) stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["export", "plot", "run", "show"]

if TYPE_CHECKING:
    from compsearch.search.api import export, plot, run, show


def __getattr__(name: str) -> Any:
    if name in __all__:
        from compsearch.search import api

        return getattr(api, name)
    raise AttributeError(f"module 'compsearch' has no attribute {name!r}")
