"""`python -m ascendfactory.engine --config <output_dir>/exp-config.yaml` (one process per device, torchrun)."""

import argparse
import sys
import traceback
import warnings

from ascendfactory.engine.faults import Diverged
from ascendfactory.errors import EXIT_FAILURE, EXIT_USER_ERROR, UserError


def run() -> int:
    parser = argparse.ArgumentParser(prog="python -m ascendfactory.engine")
    parser.add_argument("--config", required=True, help="the resolved <output_dir>/exp-config.yaml")
    parser.add_argument("--debug", action="store_true", help="tracebacks for user errors too")
    ns = parser.parse_args()
    # Known, harmless notices from megatron-core / torch that would otherwise repeat in every rank's log.
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed")
    warnings.filterwarnings("ignore", message=r".*full scope is deprecated")
    warnings.filterwarnings("ignore", message=r".*\.grad attribute of a Tensor that is not a leaf")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    from ascendfactory.engine.trainer import main

    try:
        return main(ns.config)
    except UserError as e:
        if ns.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_FAILURE
    except Exception:
        traceback.print_exc()
        return EXIT_FAILURE


sys.exit(run())
