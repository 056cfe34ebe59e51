"""`compsearch`, with one trial that kills its own process with SIGSEGV while pruning, as a
native fault in a kernel would: the first to prune after $CRASH_MARKER is written.

Run as `python crashing_compsearch.py run ...`; every worker process it starts is this
script too, so the crash may come in any of them, but only once.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from compsearch.objectives import trial as trial_module
from compsearch.search.cli import entry

real_prune = trial_module.prune


def prune(*args, **kwargs):
    marker = Path(os.environ["CRASH_MARKER"])
    try:
        with open(marker, "x") as claimed:  # exclusive: one crash across all workers
            claimed.write(str(os.getpid()))
    except FileExistsError:
        return real_prune(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGSEGV)


trial_module.prune = prune
sys.exit(entry())
