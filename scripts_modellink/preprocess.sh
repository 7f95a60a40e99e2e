#!/usr/bin/env bash
# Stage script: dataset preprocessing (stand-alone use; `train` runs the same function in-process).
#   sh preprocess.sh --input data.jsonl --tokenizer-name-or-path MODEL --output-prefix OUT/prefix ...
set -e
[ -f /usr/local/Ascend/ascend-toolkit/set_env.sh ] && . /usr/local/Ascend/ascend-toolkit/set_env.sh
exec "${AF_PYTHON:-python3}" -m ascendfactory preprocess "$@"
