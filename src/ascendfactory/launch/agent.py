"""`python -m ascendfactory.launch.agent <torchrun arguments>`: torchrun (torch's own launcher and agent) with the
run's rules, as scripts_modellink/train.sh starts it:

* it stops when `train` dies (SIGTERM: torchrun forwards it, the workers save and exit 3) and holds the run
  lock until it ends;
* a worker that exits with EXIT_USER_ERROR (bad input) is not restarted: every attempt would fail the same way;
* the root cause of a failure goes to TORCHELASTIC_ERROR_FILE in torchelastic's error-file format, with the
  failed local rank, also when the worker was killed and left no error file of its own; `train` reads it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys

import torch.distributed.launcher.api as launcher
from torch.distributed import run as torchrun
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from ascendfactory import logs
from ascendfactory.errors import EXIT_USER_ERROR, UserError
from ascendfactory.launch.lock import die_with_parent, share_run_lock

log = logging.getLogger("ascendfactory.launch.agent")  # not __name__: "__main__" under -m


class _Agent(LocalElasticAgent):
    def _monitor_workers(self, worker_group):
        result = super()._monitor_workers(worker_group)
        if any(f.exitcode == EXIT_USER_ERROR for f in result.failures.values()):
            self._remaining_restarts = 0  # torch's agent then stops the workers and fails instead of restarting
        return result


def root_failure(e: ChildFailedError) -> tuple[int, ProcessFailure]:
    """The failure that stopped the run. torch orders failures by their timestamp in whole seconds: a peer that
    failed on the dead rank's closed connection (its error file stamped in the second before) and was then stopped
    by the agent's SIGTERM would come first. Ranks the agent stopped are consequences, taken only if all were."""
    return min(e.failures.items(), key=lambda kv: (kv[1].exitcode == -signal.SIGTERM, kv[1].timestamp, kv[0]))


def _record_root_cause(e: ChildFailedError) -> None:
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    rank, failure = root_failure(e)
    # The worker's own reason when it left an error file; torch's text otherwise says nothing the code does not.
    reason = failure.message if os.path.isfile(failure.error_file) else ""
    if isinstance(reason, dict):
        reason = reason.get("message", "")
    record = {"message": {"message": reason, "errorCode": failure.exitcode,
                          "extraInfo": {"rank": rank, "local_rank": failure.local_rank,
                                        "timestamp": str(failure.timestamp)}}}
    with open(path, "w") as f:
        json.dump(record, f)


def main() -> int:
    logs.setup()
    die_with_parent(signal.SIGTERM)  # a copy of train.sh that does not exec torchrun: stop with its shell
    try:
        share_run_lock()
    except UserError as e:
        log.error(str(e))
        return EXIT_USER_ERROR
    launcher.LocalElasticAgent = _Agent  # torch's launch_agent() builds its agent by this name
    try:
        torchrun.run(torchrun.parse_args(sys.argv[1:]))
    except ChildFailedError as e:
        _record_root_cause(e)
        log.info(str(e))  # torchelastic's failure summary, as torchrun prints it
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
