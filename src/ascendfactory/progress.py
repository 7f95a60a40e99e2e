"""Plain progress lines on stderr (greppable, one per event), with a heartbeat for long steps.
Shared by the converter and preprocessing (data/preprocess.py)."""

from __future__ import annotations

import logging
import time


class Progress:
    def __init__(self, prefix: str, every_s: float = 10.0):
        self.prefix, self.every_s = prefix, every_s
        self.start = self.last = time.monotonic()

    def say(self, msg: str) -> None:
        logging.getLogger(__name__).info(f"{self.prefix}: {msg}")
        self.last = time.monotonic()

    def due(self) -> bool:
        """`every_s` seconds since the last line."""
        return time.monotonic() - self.last >= self.every_s

    def heartbeat(self, msg: str) -> None:
        """Printed at most every `every_s` seconds: shows life inside a long rank / stage."""
        if self.due():
            self.say(msg)

    def elapsed(self) -> float:
        return time.monotonic() - self.start
