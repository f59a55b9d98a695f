#!/usr/bin/env bash
# The one short run a lent GPU machine gets (README, "On a lent GPU"): what only a GPU can check, then issue 13's
# speed numbers. Run from the repository root, with the machine's own python3 (torch with CUDA, transformers, timm):
#
#     bash benchmarks/gpu_check.sh            # results in $OUT, or ./gpu_check_out where OUT is unset
#
# Each step has its own time limit, so a failing or slow step still leaves the others' results: 1. the machine and
# package versions, 2. tests/test_accelerator.py (CUDA parity, compile, export, offload, the LLaVA tower, features),
# 3. `python -m benchmarks.tower --device cuda --compile` (bf16, batch 1 and 8, eager and compiled contenders, the
# bf16 torch.mm peak of the same run). Sized to end within about 9 minutes on an H100 including compiles; the
# limits are settable: TEST_LIMIT_S, BENCH_LIMIT_S. Exit status: 0 when every step passed, else 1.
set -u
out=$(mkdir -p "${OUT:-gpu_check_out}" && cd "${OUT:-gpu_check_out}" && pwd) || exit 2  # relative to the caller
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    "$python" - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for name in ("transformers", "timm", "accelerate", "peft", "safetensors", "tokenizers", "triton", "flash_attn"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:  # a missing optional package is a line of the report, not a failure
        print(name, "unavailable:", type(error).__name__)
EOF
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"

status=0
step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to $out/NAME.log, keep going on failure
    local name=$1 limit=$2 rc
    shift 2
    echo "== $name (limit ${limit} s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
    rc=$?
    echo "== $name: exit status $rc after $((SECONDS - start)) s"
    tail -n 25 "$out/$name.log"
    [ "$rc" -eq 0 ] || status=1
}

# -v streams each result into the log, so a run cut at its limit still says how far it got; pytest-timeout (where
# installed) turns one hung test into a failure instead of the whole step's timeout.
per_test=()
"$python" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 90)
step tests "${TEST_LIMIT_S:-240}" "$python" -m pytest -v -p no:cacheprovider -rsx --durations=15 ${per_test[@]+"${per_test[@]}"} \
    tests/test_accelerator.py
step bench "${BENCH_LIMIT_S:-330}" "$python" -m benchmarks.tower --device cuda --compile \
    --output-dir "$out" --name tower_cuda --overwrite
exit "$status"
