"""`python -m ascendfactory.engine --config <output_dir>/exp-config.yaml` (one process per device, torchrun)."""

import argparse
import atexit
import json
import logging
import os
import signal
import sys
import time
import traceback
import warnings

from torch.distributed.elastic.multiprocessing.errors import record

from ascendfactory import logs
from ascendfactory.engine.faults import Diverged
from ascendfactory.errors import EXIT_FAILURE, EXIT_USER_ERROR, UserError
from ascendfactory.launch.lock import die_with_parent, share_run_lock

log = logging.getLogger("ascendfactory.engine")  # not __name__: "__main__" under -m


def _record_reason(message: str) -> None:
    """This worker's one-line reason in its torchelastic error file (torchelastic's format, without a traceback):
    torchrun's failure summary and `train`'s FAILED line show it."""
    if path := os.environ.get("TORCHELASTIC_ERROR_FILE"):
        with open(path, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time()))}}}, f)


@record  # any other exception: its traceback goes to the error file too (and to the rank's stderr)
def run() -> int:
    # torchrun gone (killed, or stopped by a second SIGTERM while this worker saves): nobody would stop or restart
    # this worker, so it stops on its own through the SIGTERM path (every rank gets it: save, exit 3).
    die_with_parent(signal.SIGTERM)
    parser = argparse.ArgumentParser(prog="python -m ascendfactory.engine")
    parser.add_argument("--config", required=True, help="the resolved <output_dir>/exp-config.yaml")
    parser.add_argument("--debug", action="store_true", help="tracebacks for user errors too")
    parser.add_argument("--reshard-to", help="load the checkpoint in full, save it here, train nothing "
                        "(engine/reshard.py)")
    ns = parser.parse_args()
    # Every rank's lines go to its log file (the trainer adds it); only rank 0's, and every rank's errors, to the
    # console: the ranks share torchrun's output.
    logs.setup(rank=int(os.environ.get("RANK", "0")))
    # Known, harmless notices from megatron-core / torch that would otherwise repeat in every rank's log.
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed")
    warnings.filterwarnings("ignore", message=r".*full scope is deprecated")
    warnings.filterwarnings("ignore", message=r".*\.grad attribute of a Tensor that is not a leaf")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    from ascendfactory.engine.trainer import main

    try:
        share_run_lock()
        return main(ns.config, ns.reshard_to)
    except UserError as e:
        if ns.debug:
            traceback.print_exc()
        log.error(str(e))
        _record_reason(str(e))
        return EXIT_USER_ERROR
    except Diverged as e:
        log.error(str(e))
        _record_reason(str(e))
        return EXIT_FAILURE


code = run()
# Every file is closed and the process group destroyed by now; the interpreter's own teardown of torch and
# megatron-core (~1 s per worker, a restart waits for it) has nothing left to do for us: the exit handlers run
# (logging's flush among them), then the process leaves without it.
atexit._run_exitfuncs()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
