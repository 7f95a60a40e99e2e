#!/usr/bin/env bash
# Stage script: weight conversion (stand-alone use; `train` runs the same function in-process).
#   sh convert.sh hf2mg --hf-dir H --mg-dir M --tp 2 --pp 1
#   sh convert.sh mg2hf --mg-dir M --hf-dir OUT --hf-config-dir H
set -e
[ -f /usr/local/Ascend/ascend-toolkit/set_env.sh ] && . /usr/local/Ascend/ascend-toolkit/set_env.sh
exec "${AF_PYTHON:-python3}" -m ascendfactory convert "$@"
