"""The root cause the agent records when workers fail: torch's own failure records, read back as `train` does."""

import json
import signal
import time

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from ascendfactory.launch import agent, torchrun


def test_a_peer_stopped_by_the_agent_is_not_the_root_cause_even_when_stamped_earlier(tmp_path, monkeypatch):
    # Rank 0 SIGKILLed (no error file); rank 1 raised on the closed connection a second earlier by its error file's
    # stamp, then got the agent's SIGTERM: the race seen in CI, where torch's own order named rank 1.
    now = int(time.time())
    peer_file = tmp_path / "1" / "error.json"
    peer_file.parent.mkdir()
    peer_file.write_text(json.dumps({"message": {"message": "RuntimeError: Connection reset by peer",
                                                 "extraInfo": {"py_callstack": "", "timestamp": str(now - 1)}}}))
    dead = ProcessFailure(local_rank=0, pid=100, exitcode=-signal.SIGKILL, error_file=str(tmp_path / "0" / "error.json"))
    peer = ProcessFailure(local_rank=1, pid=101, exitcode=-signal.SIGTERM, error_file=str(peer_file))
    e = ChildFailedError("ascendfactory.engine", {0: dead, 1: peer})
    assert e.get_first_failure()[0] == 1  # torch's order: the peer
    assert agent.root_failure(e)[0] == 0

    record = tmp_path / "error-node0.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(record))
    agent._record_root_cause(e)
    assert torchrun._cause(torchrun._root_cause(record), 1) == "local rank 0 was killed by SIGKILL"


def test_when_every_failure_is_a_sigterm_the_earliest_is_the_root_cause(tmp_path):
    files = []
    for rank, stamp in ((0, 20), (1, 10)):
        f = tmp_path / f"{rank}.json"
        f.write_text(json.dumps({"message": {"message": "x", "extraInfo": {"timestamp": str(stamp)}}}))
        files.append(ProcessFailure(local_rank=rank, pid=rank, exitcode=-signal.SIGTERM, error_file=str(f)))
    assert agent.root_failure(ChildFailedError("w", dict(enumerate(files))))[0] == 1
