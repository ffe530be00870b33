#!/usr/bin/env bash
# mergekit in a virtualenv of its own (it pins its own dependencies, transformers among them),
# for benchmarks/merge_bench.py --mergekit-venv VENV and tests/test_mergekit_parity.py
# (MERGEKIT_VENV, default /work/mergekit-venv). Independent of the Makefile and of .venv.
#
#   benchmarks/make_mergekit_venv.sh [VENV]        # default /work/mergekit-venv
#
# Both users take VENV/bin/mergekit-yaml (present means installed) and VENV/bin/python.
# torch first, pinned: 2.13.0 is the CPU build, from local disk; left to mergekit's own
# requirement (torch>=2.0.0) pip would fetch a multi-GB CUDA build. mergekit==0.1.5 then
# installs with its pins as they are (checked: transformers 5.24.0, accelerate 1.15.0,
# safetensors 0.8.0, pydantic 2.14.4, peft 0.21.2, datasets 5.2.0, huggingface_hub 2.4.0,
# numpy 2.4.6; no conflict with torch 2.13.0). The parity tests pin mergekit 0.1.5's behaviour:
# another version may differ on purpose.
set -euo pipefail

VENV="${1:-${MERGEKIT_VENV:-/work/mergekit-venv}}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
MERGEKIT_VERSION="0.1.5"

if [ -x "$VENV/bin/mergekit-yaml" ] \
    && "$VENV/bin/python" -c "import importlib.metadata as m, sys; \
sys.exit(m.version('mergekit') != '$MERGEKIT_VERSION')" 2>/dev/null; then
    echo "mergekit $MERGEKIT_VERSION is already installed in $VENV"
    exit 0
fi

"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION"
"$VENV/bin/python" -m pip install -q "mergekit==$MERGEKIT_VERSION"
"$VENV/bin/python" -m pip check
HF_HUB_OFFLINE=1 "$VENV/bin/mergekit-yaml" --help > /dev/null
echo "mergekit $MERGEKIT_VERSION (torch $TORCH_VERSION) installed in $VENV"
