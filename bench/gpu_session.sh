#!/usr/bin/env bash
# Everything issue 3 needs measured on a lent GPU, in three device calls of under 10 minutes each.
#
# Here first (pip works here, not there), once per checkout; .whl/ is git-ignored:
#   bash bench/gpu_session.sh wheels
# Then, through the device tool, carry [".whl"], back to back (the machine stays warm 30 s):
#   bash bench/gpu_session.sh part1   # GPU tests, then the full benchmark (reference, CB, engine)
#   bash bench/gpu_session.sh part2   # the engine with a compiled step, and the step's profile
#   bash bench/gpu_session.sh part3   # the app's loading path: save, from_pretrained, plan, ready
# Results land in $OUT: copy them to bench/results/<date>-<device>*.json and commit.
set -uo pipefail
case "${1:-}" in
wheels | part1 | part2 | part3) ;;
*)
    echo "usage: bash bench/gpu_session.sh wheels|part1|part2|part3" >&2
    exit 2
    ;;
esac
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/orca-gpu-out}
mkdir -p "$OUT"

if [ "${1:-}" = wheels ]; then
    # The lent machine has transformers 5.17 (we pin 5.24), no mistral-common (the tiny
    # checkpoint's tokenizer) and an older regex than transformers 5.24 asks for.
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl transformers==5.24.0 mistral-common==1.13.1 regex==2026.5.9
    exit
fi

if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.mem --format=csv

case "${1:-}" in
part1)
    timeout 180 python3 -m pytest -q -m gpu tests/test_batching.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.log"
    timeout 390 python3 bench/engine_bench.py --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | grep -v '^ '
    ;;
part2)
    timeout 330 python3 bench/engine_bench.py --skip reference cb --compile-step --out "$OUT/bench-compiled.json" \
        2>&1 | tee "$OUT/bench-compiled.log" | grep -v '^ '
    timeout 200 python3 bench/profile_step.py --out "$OUT/profile.json" 2>&1 | tee "$OUT/profile.log"
    ;;
part3)
    df -h /tmp | tail -1  # the checkpoint takes 14.5 GB
    timeout 540 python3 bench/load_path.py --out "$OUT/load-path.json" 2>&1 | tee "$OUT/load-path.log"
    ;;
esac
