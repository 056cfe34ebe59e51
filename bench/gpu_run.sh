#!/usr/bin/env bash
# The GPU figures in one go, on a bare machine with torch, torchvision, onnx and
# onnxruntime but no network, from the repository root:
#
#   bash bench/gpu_run.sh
#
# Needs, beside the tracked files (none of them in git; see each script's docstring):
#   .whl/*.whl                 the packages the machine lacks (optuna and its needs,
#                              ptflops, torch-pruning), installed into /tmp/site
#   .data/cifar10-jpeg.npz     the CIFAR-10 JPEG copy, packed (bench/pack_folder.py), or
#   .data/cifar10-jpeg/        the folder itself
#   .airbench/airbench94.py    airbench94, unmodified (KellerJordan/cifar10-airbench,
#                              legacy/airbench94.py)
#
# Writes into $OUT (default ./gpu-out): setup.log, airbench94.log and .json,
# airbench_network.log and .json, time_to_accuracy.log and .json (7 files). Each step has a
# time limit and a failed step does not stop the next; the time-to-accuracy step comes last
# and gets what is left of TOTAL seconds (default 560), its JSON rewritten after each run.
# Knobs (environment variables): A_EPOCHS, B_EPOCHS, AIRBENCH_RUNS (0: skip airbench94),
# A_ARGS, B_ARGS (extra arguments), WORKERS_ARGS (when set, also runs
# bench/workers_throughput.py with them), TOTAL, and the limits B_LIMIT, AIRBENCH_LIMIT and
# WORKERS_LIMIT in seconds.
set -uo pipefail

OUT=${OUT:-$PWD/gpu-out}
PY=${PYTHON:-python3}
A_EPOCHS=${A_EPOCHS:-10 20 40 80}
B_EPOCHS=${B_EPOCHS:-10 20 30 40}
AIRBENCH_RUNS=${AIRBENCH_RUNS:-5}
A_ARGS=${A_ARGS:-}
B_ARGS=${B_ARGS:-}
TOTAL=${TOTAL:-560}
B_LIMIT=${B_LIMIT:-150}
AIRBENCH_LIMIT=${AIRBENCH_LIMIT:-90}
DATA=.data/cifar10-jpeg
SHIM=/tmp/compsearch-path
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
started=$(date +%s)
say() { echo "[$(($(date +%s) - started)) s] $*"; }

setup() {
    say "setup"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$PY" --version
    # Packages the machine lacks; torch, numpy, onnx, onnxruntime, pandas, rich, pillow,
    # scipy and scikit-learn are there.
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || return 1
    # The packages compsearch.spaces, compsearch.objectives, ... live in top-level folders
    # (pyproject's package-dir), so this tree on PYTHONPATH is not enough: a folder of
    # links lays them out as the installed package, always the current files.
    "$PY" - "$SHIM" <<'EOF' || return 1
import sys
import tomllib
from pathlib import Path

root, shim = Path.cwd(), Path(sys.argv[1]) / "compsearch"
folders = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
shim.mkdir(parents=True, exist_ok=True)
for package, folder in folders.items():
    if package == "compsearch":
        for source in (root / folder).glob("*.py"):
            (shim / source.name).unlink(missing_ok=True)
            (shim / source.name).symlink_to(source)
    else:
        link = shim / package.split(".", 1)[1]
        link.unlink(missing_ok=True)
        link.symlink_to(root / folder, target_is_directory=True)
print("compsearch laid out in", shim)
EOF
    # From /tmp: in the repository root, its own compsearch/ folder would come first.
    (cd /tmp && PYTHONPATH=/tmp/site:$SHIM "$PY" -) <<'EOF' || return 1
import importlib
import importlib.metadata

import compsearch.objectives.trial
import compsearch.search.run  # optuna

for module, package in (
    ("torch", "torch"), ("torchvision", "torchvision"), ("onnx", "onnx"),
    ("onnxruntime", "onnxruntime"), ("optuna", "optuna"), ("ptflops", "ptflops"),
    ("torch_pruning", "torch-pruning"),
):
    try:
        importlib.import_module(module)
        print(module, importlib.metadata.version(package))
    except ImportError as error:  # torchvision: airbench94 alone needs it
        print(module, "MISSING:", error)
print("compsearch from", compsearch.objectives.trial.__file__)
EOF
    if [ ! -d "$DATA/train" ]; then
        "$PY" bench/pack_folder.py unpack "$DATA.npz" "$DATA" || return 1
    fi
    "$PY" bench/cifar_tensors.py "$DATA" .data/cifar10 || return 1
    say "setup done"
}

step() {  # name limit command...: run with a time limit, output to the screen and $OUT/name.log
    local name=$1 limit=$2
    shift 2
    say "$name: $*"
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local status=${PIPESTATUS[0]}
    say "$name: exit status $status"
}

setup 2>&1 | tee "$OUT/setup.log"
if [ "${PIPESTATUS[0]}" -ne 0 ]; then
    say "setup failed; see $OUT/setup.log"
    exit 1
fi
export PYTHONPATH=/tmp/site:$SHIM

if [ "$AIRBENCH_RUNS" -gt 0 ]; then
    step airbench94 "$AIRBENCH_LIMIT" "$PY" bench/airbench_runs.py --file .airbench/airbench94.py \
        --data-root .data --runs "$AIRBENCH_RUNS" --json "$OUT/airbench94.json"
fi
# shellcheck disable=SC2086  # the epoch lists and extra arguments are word lists
step airbench_network "$B_LIMIT" "$PY" bench/airbench_network.py --dataset "folder:$DATA" \
    --epochs $B_EPOCHS --json "$OUT/airbench_network.json" $B_ARGS
if [ -n "${WORKERS_ARGS:-}" ]; then
    # shellcheck disable=SC2086
    step workers "${WORKERS_LIMIT:-240}" "$PY" bench/workers_throughput.py \
        --dataset "folder:$DATA" $WORKERS_ARGS
fi
left=$((TOTAL - ($(date +%s) - started)))
# shellcheck disable=SC2086
step time_to_accuracy "$((left > 60 ? left : 60))" "$PY" bench/gpu_time_to_accuracy.py \
    --dataset "folder:$DATA" --epochs $A_EPOCHS --json "$OUT/time_to_accuracy.json" $A_ARGS
say "all done; files in $OUT:" "$OUT"/*
