"""`plan --json` on every shipped experiment with a matching device count, and the ModelArts layout."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ascendfactory.config.loader import list_experiments, resolve

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "configs" / "modellink_performance_cfgs.yaml"
LAYOUT_KEYS = {"device", "world_size", "nnodes", "nproc_per_node", "node_rank", "master_addr", "master_port", "tp",
               "pp", "cp", "dp", "micro_batch_size", "global_batch_size", "num_microbatches", "ep", "expert_dp"}
PATH_KEYS = {"output_dir", "processed_data_dir", "converted_ckpt_dir", "save_dir", "hf_save_dir", "logs_dir"}
CLEAN_ENV = {k: v for k, v in os.environ.items()
             if k not in ("MA_NUM_HOSTS", "VC_WORKER_NUM", "VC_TASK_INDEX", "VC_WORKER_HOSTS", "MA_NUM_GPUS",
                          "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK")}


def plan_json(*args, env=None):
    code = ("import sys, json\nfrom ascendfactory.cli import main\ntry:\n    main(sys.argv[1:])\n"
            "finally:\n    heavy = [m for m in ('torch', 'megatron', 'transformers') if m in sys.modules]\n"
            "    print('HEAVY=' + json.dumps(heavy), file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", code, "plan", *map(str, args), "--json"], capture_output=True,
                       text=True, env={**CLEAN_ENV, **(env or {})}, timeout=120)
    return r


def shipped_cases():
    for model, exps in list_experiments(SHIPPED).items():
        for exp in exps:
            yield model, exp


@pytest.mark.parametrize("model,exp", list(shipped_cases()))
def test_plan_json_for_each_shipped_experiment(model, exp, tmp_path):
    cfg = resolve(SHIPPED, model, exp).cfg
    devices = cfg.tp * cfg.pp * cfg.cp * cfg.ep  # MoE: EP must divide DP x CP, so DP = EP (1 for a dense model)
    nodes, per_node = (devices // 8, 8) if devices > 8 else (1, devices)
    env = {"MA_NUM_HOSTS": str(nodes), "VC_TASK_INDEX": "0", "VC_WORKER_HOSTS": ",".join(f"n{i}" for i in
           range(nodes)), "MA_NUM_GPUS": str(per_node)}
    r = plan_json(SHIPPED, model, exp, f"--output_dir={tmp_path / 'out'}", env=env)
    assert r.returncode == 0, r.stderr
    assert "HEAVY=[]" in r.stderr, r.stderr  # plan on a config without model files imports no torch
    out = json.loads(r.stdout)
    assert set(out) >= {"config", "layout", "stages", "paths"}
    assert set(out["layout"]) == LAYOUT_KEYS and set(out["paths"]) == PATH_KEYS
    lay = out["layout"]
    assert lay["world_size"] == devices and lay["dp"] == cfg.ep and lay["ep"] == cfg.ep
    assert lay["num_microbatches"] == cfg.global_batch_size // (cfg.micro_batch_size * lay["dp"])
    assert [s["name"] for s in out["stages"]] == ["preprocess", "convert", "train", "export"]
    assert all(isinstance(s["run"], bool) and s["reason"] for s in out["stages"])
    assert out["config"]["tensor_model_parallel_size"] == cfg.tp and "micro_batch_size" in out["config"]
    assert out["unchecked"]  # model files are not on this machine: say which rules were not checked
    assert not (tmp_path / "out").exists()  # plan writes nothing
    train = next(s for s in out["stages"] if s["name"] == "train")
    assert ("of LoRA (r 16 on linear_qkv, linear_proj, linear_fc1, linear_fc2)" in train["reason"]) == (
        cfg.finetuning_type == "lora"), train


def test_plan_modelarts_4_nodes(tmp_path):
    env = {"MA_NUM_HOSTS": "4", "VC_TASK_INDEX": "2", "VC_WORKER_HOSTS": "h0,h1,h2,h3", "MA_NUM_GPUS": "8"}
    r = plan_json(SHIPPED, "qwen2.5-72b", "4096-sft-full", f"--output_dir={tmp_path}", env=env)
    assert r.returncode == 0, r.stderr
    lay = json.loads(r.stdout)["layout"]
    assert (lay["world_size"], lay["nnodes"], lay["node_rank"], lay["master_addr"]) == (32, 4, 2, "h0")
    assert (lay["tp"], lay["pp"], lay["dp"], lay["num_microbatches"]) == (8, 4, 1, 128)
    r = plan_json(SHIPPED, "qwen2.5-7b", "4096-sft-full", f"--output_dir={tmp_path}", env=env)
    lay = json.loads(r.stdout)["layout"]
    assert (lay["tp"], lay["dp"], lay["num_microbatches"]) == (2, 16, 8)


def test_plan_refuses_invalid_layout_exit_2(tmp_path):
    env = {"MA_NUM_HOSTS": "1", "MA_NUM_GPUS": "6"}
    r = plan_json(SHIPPED, "qwen2.5-7b", "4096-sft-full", "--global-batch-size=100", env=env)
    assert r.returncode == 2 and "global_batch_size (100) must be divisible" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("override,message", [
    ("--lr=.nan", "command line: `lr` = nan: must be a finite number >= 0"),
    ("--save_grace_period=.inf", "command line: `save_grace_period` = inf: must be a finite number >= 0"),
    ("--extra_args.loss_scale=.nan", ("command line: `extra_args` = {'loss_scale': nan}: extra_args.loss_scale is "
                                      "not a finite number")),
    ("--log_interval=0", "command line: `log_interval` = 0: must be >= 1"),
])
def test_plan_json_refuses_non_finite_and_out_of_range_values(tmp_path, override, message):
    env = {"MA_NUM_HOSTS": "1", "MA_NUM_GPUS": "2"}
    r = plan_json(SHIPPED, "qwen2.5-7b", "4096-sft-full", f"--output_dir={tmp_path}", override, env=env)
    assert r.returncode == 2 and f"error: {message}" in r.stderr and r.stdout == "", r.stderr
    assert "Traceback" not in r.stderr
    r = plan_json(SHIPPED, "qwen2.5-7b", "4096-sft-full", f"--output_dir={tmp_path}", "--lr=1e-5", env=env)

    def refuse(constant):
        raise AssertionError(f"{constant} in plan --json")

    assert r.returncode == 0 and json.loads(r.stdout, parse_constant=refuse)["config"]["lr"] == 1e-5
