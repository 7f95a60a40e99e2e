"""The run's layout on this cluster (layout.RunLayout): nodes, devices per node, ranks, master; then TP/PP/CP/DP
and micro-batches.

Sources, highest priority first: --master_addr/--num_nodes/--rank flags; ModelArts env
(MA_NUM_HOSTS or VC_WORKER_NUM, VC_TASK_INDEX, VC_WORKER_HOSTS, MA_NUM_GPUS); torchrun-style env
(MASTER_ADDR, MASTER_PORT, NNODES, NODE_RANK); a single node. Read without importing torch.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re

from ascendfactory.config.schema import ExpConfig
from ascendfactory.errors import UserError
from ascendfactory.layout import ClusterLayout, RunLayout, parallel_layout


def _env_int(env: dict, name: str) -> int | None:
    raw = env.get(name)
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not an integer") from None


def _usable_host(host: str | None) -> bool:
    """A host name or IP address (v4 or v6): not empty, not a placeholder such as `_`."""
    return bool(host and re.fullmatch(r"[\w.:\[\]-]+", host) and re.search(r"[A-Za-z0-9]", host))


def _visible(env: dict, name: str) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    return len([d for d in raw.split(",") if d.strip() != ""])


def _dev_count(pattern: str) -> int:
    return len([p for p in glob.glob(pattern) if re.search(r"\d+$", p)])


def detect_device(requested: str, env: dict) -> str:
    """auto: npu when torch_npu is installed and NPUs are present, else cuda when GPUs are, else cpu.
    Decided from the environment and /dev, so planning never imports torch."""
    if requested != "auto":
        return requested
    if importlib.util.find_spec("torch_npu") is not None and (
        env.get("ASCEND_RT_VISIBLE_DEVICES") or _dev_count("/dev/davinci*") > 0
    ):
        return "npu"
    if _dev_count("/dev/nvidia*") > 0 and env.get("CUDA_VISIBLE_DEVICES") != "":
        return "cuda"
    return "cpu"


def devices_per_node(cfg: ExpConfig, device: str, env: dict, modelarts: bool) -> int:
    if cfg.nproc_per_node:
        return cfg.nproc_per_node
    gpus = _env_int(env, "MA_NUM_GPUS")
    if gpus is not None and gpus < 0:
        raise UserError(f"MA_NUM_GPUS = {gpus}: the number of devices per node cannot be negative")
    if modelarts and gpus:
        return gpus
    if device == "npu":
        return _visible(env, "ASCEND_RT_VISIBLE_DEVICES") or _dev_count("/dev/davinci*") or 1
    if device == "cuda":
        return _visible(env, "CUDA_VISIBLE_DEVICES") or _dev_count("/dev/nvidia*") or 1
    return 1


def cluster_layout(cfg: ExpConfig, flags: dict | None = None, env: dict | None = None) -> RunLayout:
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    env = dict(os.environ if env is None else env)
    device = detect_device(cfg.device, env)

    # Each value keeps the name of the env var or flag it came from, so that a bad one is reported by that name.
    env = {k: v for k, v in env.items() if v.strip() != ""}  # an empty variable is an unset one
    nodes_var = next((v for v in ("MA_NUM_HOSTS", "VC_WORKER_NUM") if v in env), None)
    modelarts = nodes_var is not None
    if modelarts:
        source, rank_var = "ModelArts env", "VC_TASK_INDEX"
        if "VC_WORKER_HOSTS" in env or "MASTER_ADDR" not in env:  # the first worker host is the master
            master, master_var = env.get("VC_WORKER_HOSTS", "").split(",")[0].strip() or None, "VC_WORKER_HOSTS"
        else:
            master, master_var = env["MASTER_ADDR"], "MASTER_ADDR"
    elif "NNODES" in env or "MASTER_ADDR" in env:
        source, nodes_var, rank_var = "torchrun env", "NNODES", "NODE_RANK"
        master, master_var = env.get("MASTER_ADDR"), "MASTER_ADDR"
    else:
        source, nodes_var, rank_var, master, master_var = "single node", None, None, None, "--master_addr"
    nnodes = _env_int(env, nodes_var) if nodes_var in env else 1
    node_rank = _env_int(env, rank_var) if rank_var in env else 0
    if flags:
        source = "command-line flags"
        nnodes, nodes_var = (flags["num_nodes"], "--num_nodes") if "num_nodes" in flags else (nnodes, nodes_var)
        node_rank, rank_var = (flags["rank"], "--rank") if "rank" in flags else (node_rank, rank_var)
        master, master_var = (flags["master_addr"], "--master_addr") if "master_addr" in flags else (master, master_var)
    port = _env_int(env, "MASTER_PORT") or cfg.master_port

    if nnodes < 1:
        raise UserError(f"{nodes_var} = {nnodes}: the number of nodes must be at least 1")
    if not 0 <= node_rank < nnodes:
        raise UserError(f"{rank_var or '--rank'} = {node_rank}: the node rank must be in 0..{nnodes - 1} "
                        f"({nnodes} node(s), {source})")
    if not 1 <= port <= 65535:
        raise UserError(f"MASTER_PORT = {port}: must be in [1, 65535]")
    if master is None and nnodes == 1:
        master = "127.0.0.1"
    elif not _usable_host(master):
        # every node must dial the same rendezvous host: guessing 127.0.0.1 would hang a multi-node job
        also = "" if master_var == "--master_addr" else " (or --master_addr)"
        raise UserError(f"{master_var} = {master or ''!r}: not a usable master address ({nnodes} node(s)); set "
                        f"{master_var}{also} to the host name or IP of node 0")
    nproc = devices_per_node(cfg, device, env, modelarts)
    world = nnodes * nproc
    cluster = ClusterLayout(device=device, world_size=world, nnodes=nnodes, nproc_per_node=nproc,
                            node_rank=node_rank, master_addr=master, master_port=port, source=source)
    return RunLayout(cluster, parallel_layout(cfg, world))
