"""Cluster layout: nodes, devices per node, ranks, master; then TP/PP/CP/DP and micro-batches.

Sources, highest priority first: --master_addr/--num_nodes/--rank flags; ModelArts env
(MA_NUM_HOSTS or VC_WORKER_NUM, VC_TASK_INDEX, VC_WORKER_HOSTS, MA_NUM_GPUS); torchrun-style env
(MASTER_ADDR, MASTER_PORT, NNODES, NODE_RANK); a single node. Read without importing torch.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
from dataclasses import asdict, dataclass

from ascendfactory.config.schema import ExpConfig
from ascendfactory.errors import UserError


@dataclass(frozen=True)
class Layout:
    device: str
    world_size: int
    nnodes: int
    nproc_per_node: int
    node_rank: int
    master_addr: str
    master_port: int
    tp: int
    pp: int
    cp: int
    dp: int | None  # None when TP*PP*CP does not divide the world size (a rule reports it)
    micro_batch_size: int
    global_batch_size: int
    num_microbatches: int | None
    ep: int = 1  # expert parallel (MoE)
    expert_dp: int | None = None  # expert data parallel: DP x CP / EP (expert TP = TP); None when EP does not divide
    source: str = "single node"

    def as_json(self) -> dict:
        d = asdict(self)
        d.pop("source")
        return d


def _env_int(env: dict, name: str) -> int | None:
    raw = env.get(name)
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not an integer") from None


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
    if modelarts and _env_int(env, "MA_NUM_GPUS"):
        return _env_int(env, "MA_NUM_GPUS")
    if device == "npu":
        return _visible(env, "ASCEND_RT_VISIBLE_DEVICES") or _dev_count("/dev/davinci*") or 1
    if device == "cuda":
        return _visible(env, "CUDA_VISIBLE_DEVICES") or _dev_count("/dev/nvidia*") or 1
    return 1


def cluster_layout(cfg: ExpConfig, flags: dict | None = None, env: dict | None = None) -> Layout:
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    env = dict(os.environ if env is None else env)
    device = detect_device(cfg.device, env)

    ma_nodes = _env_int(env, "MA_NUM_HOSTS") or _env_int(env, "VC_WORKER_NUM")
    modelarts = ma_nodes is not None
    hosts = [h.strip() for h in env.get("VC_WORKER_HOSTS", "").split(",") if h.strip()]
    if modelarts:
        nnodes, node_rank, source = ma_nodes, _env_int(env, "VC_TASK_INDEX") or 0, "ModelArts env"
        master = hosts[0] if hosts else env.get("MASTER_ADDR", "127.0.0.1")
    elif env.get("NNODES") or env.get("MASTER_ADDR"):
        nnodes, node_rank, source = _env_int(env, "NNODES") or 1, _env_int(env, "NODE_RANK") or 0, "torchrun env"
        master = env.get("MASTER_ADDR", "127.0.0.1")
    else:
        nnodes, node_rank, master, source = 1, 0, "127.0.0.1", "single node"
    if flags:
        source = "command-line flags"
        nnodes = flags.get("num_nodes", nnodes)
        node_rank = flags.get("rank", node_rank)
        master = flags.get("master_addr", master)
    port = _env_int(env, "MASTER_PORT") or cfg.master_port

    if nnodes < 1:
        raise UserError(f"number of nodes is {nnodes} ({source}); it must be at least 1")
    if not 0 <= node_rank < nnodes:
        raise UserError(f"node rank {node_rank} is outside 0..{nnodes - 1} ({source}); fix --rank / VC_TASK_INDEX")
    nproc = devices_per_node(cfg, device, env, modelarts)
    world = nnodes * nproc
    model_par = cfg.tp * cfg.pp * cfg.cp
    dp = world // model_par if model_par > 0 and world % model_par == 0 else None
    mbs, gbs = cfg.micro_batch_size, cfg.global_batch_size
    nmb = gbs // (mbs * dp) if dp and mbs > 0 and gbs % (mbs * dp) == 0 else None
    # megatron-core's expert groups: the DP x CP ranks of a TP x PP position split into EP x expert-DP
    expert_dp = dp * cfg.cp // cfg.ep if dp and cfg.ep > 0 and dp * cfg.cp % cfg.ep == 0 else None
    return Layout(device=device, world_size=world, nnodes=nnodes, nproc_per_node=nproc, node_rank=node_rank,
                  master_addr=master, master_port=port, tp=cfg.tp, pp=cfg.pp, cp=cfg.cp, dp=dp,
                  micro_batch_size=mbs, global_batch_size=gbs, num_microbatches=nmb, ep=cfg.ep,
                  expert_dp=expert_dp, source=source)
