#!/bin/sh
# Install ascendfactory into the current Python environment.
#   sh install.sh              everything, the test extras included (the README's and .ci/run's form)
#   sh install.sh modellink    the ModelArts boot command, run at every job start: only what running needs
#                              (no test / plotting / peft extras), so it stays fast from pip's cache
# Keeps an existing torch / torch_npu (Ascend images ship their own); installs the CPU
# build of torch only where no torch is importable.
set -e
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python
# torch is imported once (seconds on an NPU image): its version decides everything below
if TORCH_VERSION=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null); then
  echo "install.sh: keeping installed torch $TORCH_VERSION"
else
  echo "install.sh: no torch found, installing the CPU build"
  "$PY" -m pip install "torch==2.13.0" || "$PY" -m pip install torch --index-url https://download.pytorch.org/whl/cpu
  TORCH_VERSION=$("$PY" -c "import torch; print(torch.__version__)")
fi
# -c pins torch to the one installed so no dependency can upgrade or replace it.
TORCH_PIN=$(mktemp)
echo "torch==$TORCH_VERSION" > "$TORCH_PIN"
if [ "${1:-}" = "modellink" ]; then
  # one pip run (each one resolves every requirement again); gigatoken is an optional speed-up
  "$PY" -m pip install -q -c "$TORCH_PIN" -e ".[fast]" || "$PY" -m pip install -q -c "$TORCH_PIN" -e .
  echo "install.sh: installed what running needs; skipped the test extras (pytest, tensorboard, matplotlib," \
    "sentencepiece, tiktoken) and peft: sh install.sh (no argument) installs them"
else
  "$PY" -m pip install -c "$TORCH_PIN" -e ".[test]"
  # peft: only the LoRA adapter export's test loads it (skipped without); not needed to train or export.
  "$PY" -m pip install -c "$TORCH_PIN" -e ".[peft]" || echo "install.sh: peft not installed; its test will be skipped"
  # Optional speed-up for preprocessing; everything works without it.
  "$PY" -m pip install -c "$TORCH_PIN" -e ".[fast]" ||
    echo "install.sh: gigatoken not installed; preprocessing uses the HF tokenizer"
fi
rm -f "$TORCH_PIN"
if [ "${1:-}" = "modellink" ]; then
  "$PY" -c "import gigatoken" >/dev/null 2>&1 ||
    echo "install.sh: gigatoken not installed; preprocessing uses the HF tokenizer"
  if "$PY" -c "import torch_npu" >/dev/null 2>&1; then
    echo "install.sh: kept installed torch_npu $("$PY" -c 'import torch_npu; print(torch_npu.__version__)')"
  fi
fi
BIN=$("$PY" -c "import sysconfig; print(sysconfig.get_path('scripts'))")
case ":$PATH:" in *":$BIN:"*) ;; *) echo "install.sh: add $BIN to PATH to use ascendfactory-cli";; esac
echo "install.sh: done; try: ascendfactory-cli --help"
