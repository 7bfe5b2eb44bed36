#!/usr/bin/env bash
# Everything the GPU-figures issue needs, in one device call of at most 9 minutes.
#
# Here first (pip works here, not there), once per checkout; .whl/ is git-ignored:
#   bash bench/device_check.sh wheels
# Then, through the device tool, in ONE call with carry [".whl"] and timeout_s 540 (the wheels'
# install and the 8-minute budget, imports included, fit inside it):
#   bash bench/device_check.sh
# It writes $OUT/device-check.json after every measurement (and the log beside it): copy it to
# bench/results/<date>-<device>.json and commit. It also writes $OUT/step-defaults.json, the
# decode-step variant the measurements chose for CUDA (bench/step_variants.py): copy its "cuda"
# line into orca_space/engines/step_defaults.json and commit; the engine reads it from there
# (step_options.defaults_for). The profile of today's step and the chosen one is in the JSON
# (step "profile"). Then give the machine back at once.
#
# The lent machine has torch 2.11 and transformers 5.17 (Python 3.12); the app pins
# transformers 5.24. The wheels carried (about 28 MB, all pure Python or manylinux x86_64):
#   transformers 5.24.0 (13.5 MB), mistral-common 1.13.1 (6.6 MB: the tokenizer file the tiny
#   checkpoint uses), tokenizers 0.23.3 (3.4 MB), sentencepiece 0.2.3 (1.7 MB), huggingface_hub
#   2.4.0 (0.9 MB), regex (0.8 MB), safetensors 0.8.0 (0.5 MB), pytest 9.2.0 + pluggy + iniconfig
#   + pytest-timeout (0.5 MB), protobuf 7.36.2 (0.3 MB), httpx2 + httpcore2 2.16.2 (0.2 MB).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/orca-device-check}
mkdir -p "$OUT"

if [ "${1:-}" = wheels ]; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl transformers==5.24.0 mistral-common==1.13.1 tokenizers==0.23.3 sentencepiece==0.2.3 \
        huggingface_hub==2.4.0 regex==2026.5.9 safetensors==0.8.0 protobuf==7.36.2 httpx2==2.16.2 \
        httpcore2==2.16.2 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pytest-timeout==2.4.0
    ls -l .whl
    du -sh .whl
    exit
fi

export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    # Use the carried set only if it imports on this machine; else say so and use the machine's own.
    if PYTHONPATH=/tmp/site python3 -c "import transformers, tokenizers, huggingface_hub" 2>"$OUT/wheels.err"; then
        export PYTHONPATH=/tmp/site
    else
        echo "the carried wheels do not import here (see wheels.err); using the machine's own packages"
    fi
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.mem --format=csv | tee "$OUT/nvidia-smi.csv"
timeout 500 python3 bench/device_check.py --out "$OUT/device-check.json" --budget 480 2>&1 | tee "$OUT/device-check.log"
