#!/bin/sh
# Install ascendfactory into the current Python environment.
#   sh install.sh [modellink]
# Keeps an existing torch / torch_npu (Ascend images ship their own); installs the CPU
# build of torch only where no torch is importable.
set -e
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python
if "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "install.sh: keeping installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  echo "install.sh: no torch found, installing the CPU build"
  "$PY" -m pip install "torch==2.13.0" || "$PY" -m pip install torch --index-url https://download.pytorch.org/whl/cpu
fi
# -c pins torch to the one installed so no dependency can upgrade or replace it.
TORCH_PIN=$(mktemp)
"$PY" -c "import torch; print('torch==' + torch.__version__)" > "$TORCH_PIN"
"$PY" -m pip install -c "$TORCH_PIN" -e ".[test]"
# peft: only the LoRA adapter export's test loads it (skipped without); not needed to train or export.
"$PY" -m pip install -c "$TORCH_PIN" -e ".[peft]" || echo "install.sh: peft not installed; its test will be skipped"
# Optional speed-up for preprocessing; everything works without it.
"$PY" -m pip install -c "$TORCH_PIN" -e ".[fast]" || echo "install.sh: gigatoken not installed; preprocessing uses the HF tokenizer"
rm -f "$TORCH_PIN"
if [ "${1:-}" = "modellink" ] && "$PY" -c "import torch_npu" >/dev/null 2>&1; then
  echo "install.sh: torch_npu present ($("$PY" -c 'import torch_npu; print(torch_npu.__version__)'))"
fi
BIN=$("$PY" -c "import sysconfig; print(sysconfig.get_path('scripts'))")
case ":$PATH:" in *":$BIN:"*) ;; *) echo "install.sh: add $BIN to PATH to use ascendfactory-cli";; esac
echo "install.sh: done; try: ascendfactory-cli --help"
