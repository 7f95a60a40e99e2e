"""Stop requests (SIGTERM / SIGINT), divergence, and the test hook that SIGKILLs the run at a named point."""

from __future__ import annotations

import os
import signal
import time

# Set by tests only: "<point>:<iteration>" SIGKILLs rank 0 when it reaches that point (torchrun then
# stops the other workers): "mid_iteration:N" (after forward/backward, before the optimizer step),
# "save_files:N" (all rank files written, folder not yet renamed), "save_tracker:N" (renamed, tracker
# not yet replaced), "after_save:N" (checkpoint complete). An optional third part ":A" fires only in the
# first A torchrun attempts (TORCHELASTIC_RESTART_COUNT < A), so a restarted run can get past the point.
KILL_HOOK_ENV = "ASCENDFACTORY_TEST_KILL_AT"


class Diverged(Exception):
    """The loss or the gradient norm is no longer finite: the weights are unusable and are not saved."""


class StopRequest:
    """Remembers a SIGTERM / SIGINT; the trainer all-reduces `requested` so every rank stops together."""

    def __init__(self):
        self.signal_name: str | None = None
        self.since: float | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            self.since = time.monotonic()

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def elapsed(self) -> float:
        return 0.0 if self.since is None else time.monotonic() - self.since


def kill_point(point: str, iteration: int, rank: int) -> None:
    spec = os.environ.get(KILL_HOOK_ENV)
    if rank != 0 or not spec:
        return
    parts = spec.split(":")
    attempts = int(parts[2]) if len(parts) > 2 else None
    if parts[:2] == [point, str(iteration)] and (
        attempts is None or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) < attempts
    ):
        os.kill(os.getpid(), signal.SIGKILL)
