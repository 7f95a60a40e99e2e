"""Every layout / config rule, both ways, and the four cluster-layout sources."""

import json
import re

import pytest

from ascendfactory.config.loader import resolve
from ascendfactory.errors import UserError, UserErrors
from ascendfactory.launch.cluster import cluster_layout
from ascendfactory.pipeline import check

QWEN2_7B = {"architectures": ["Qwen2ForCausalLM"], "num_attention_heads": 28, "num_key_value_heads": 4,
            "num_hidden_layers": 28, "hidden_size": 3584, "intermediate_size": 18944, "vocab_size": 152064}


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "Qwen2-7B"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(QWEN2_7B))
    return d


def resolved(tmp_path, model_dir, **keys):
    base = {"model_name_or_path": str(model_dir), "output_dir": str(tmp_path / "out"), "dataset": "/d.json",
            "tensor-model-parallel-size": 4, "micro-batch-size": 1, "global-batch-size": 64}
    base.update(keys)
    p = tmp_path / "cfg.yaml"
    p.write_text(json.dumps({"m": {**base, "e": {}}}))
    return resolve(p, "m", "e")


def problems(tmp_path, model_dir, world=8, **keys):
    r = resolved(tmp_path, model_dir, nproc_per_node=world, **keys)
    return check(r, cluster_layout(r.cfg, env={})).problems


def refused(tmp_path, model_dir, pattern, **keys):
    with pytest.raises(UserErrors, match=pattern):
        resolved(tmp_path, model_dir, nproc_per_node=8, **keys)


def one(tmp_path, model_dir, pattern, **keys):
    ps = problems(tmp_path, model_dir, **keys)
    assert len(ps) == 1 and re.search(pattern, ps[0]), ps
    return ps[0]


def test_valid_layout_has_no_problems(tmp_path, model_dir):
    assert problems(tmp_path, model_dir) == []


def test_tp_pp_cp_must_divide_world(tmp_path, model_dir):
    one(tmp_path, model_dir, r"tensor_model_parallel_size \(4\) x pipeline_model_parallel_size \(1\) x "
        r"context_parallel_size \(1\) = 4 must divide the world size 6", world=6)


def test_tp_cp_must_divide_heads(tmp_path, model_dir):
    msg = problems(tmp_path, model_dir, world=8, **{"tensor-model-parallel-size": 1, "context_parallel_size": 8,
                                                   "SEQ_LEN": 4096})
    assert any("must divide num_attention_heads (28" in m for m in msg), msg


def test_kv_heads_divisible_by_tp(tmp_path, model_dir):
    ps = problems(tmp_path, model_dir, world=8, **{"tensor-model-parallel-size": 8})
    assert any("num_key_value_heads (4" in m and "tensor_model_parallel_size (8)" in m for m in ps), ps


def test_layers_divisible_by_pp(tmp_path, model_dir):
    one(tmp_path, model_dir, r"num_hidden_layers \(28.*pipeline_model_parallel_size \(3\)", world=12,
        **{"pipeline-model-parallel-size": 3, "global-batch-size": 63})


def test_uneven_layer_list_allows_any_pp(tmp_path, model_dir):
    assert problems(tmp_path, model_dir, world=12, **{"pipeline-model-parallel-size": 3, "global-batch-size": 63,
                                                       "num_layer_list": "9,10,9"}) == []
    one(tmp_path, model_dir, r"sums to 27", world=12,
        **{"pipeline-model-parallel-size": 3, "global-batch-size": 63, "num_layer_list": "9,9,9"})


def test_gbs_divisible_by_mbs_dp(tmp_path, model_dir):
    one(tmp_path, model_dir, r"global_batch_size \(63\) must be divisible by micro_batch_size \(1\) x "
        r"data-parallel size \(2", world=8, **{"global-batch-size": 63})


def test_seq_len_le_max_pe(tmp_path, model_dir):
    one(tmp_path, model_dir, r"seq_len \(8192\) must be <= max_pe \(4096\)", SEQ_LEN=8192, MAX_PE=4096)


def test_seq_len_divisible_by_2cp(tmp_path, model_dir):
    one(tmp_path, model_dir, r"seq_len \(4102\) must be divisible by 2 x context_parallel_size \(4\)",
        context_parallel_size=2, SEQ_LEN=4102, MAX_PE=8192, **{"tensor-model-parallel-size": 2})


def test_seq_len_divisible_by_tp_with_sequence_parallel(tmp_path, model_dir):
    one(tmp_path, model_dir, r"seq_len \(4097\) .*tensor_model_parallel_size x context_parallel_size \(2\) with "
        "sequence_parallel; use a multiple of 2", sequence_parallel=True, SEQ_LEN=4097, MAX_PE=8192,
        **{"tensor-model-parallel-size": 2})
    assert problems(tmp_path, model_dir, sequence_parallel=False, SEQ_LEN=4097, MAX_PE=8192,
                    **{"tensor-model-parallel-size": 2}) == []


def test_long_seq_without_cp_warns(tmp_path, model_dir):
    r = resolved(tmp_path, model_dir, nproc_per_node=8, SEQ_LEN=65536, MAX_PE=65536)
    rep = check(r, cluster_layout(r.cfg, env={}))
    assert rep.problems == [] and "context_parallel_size >= 2 is recommended" in rep.warnings[0]


@pytest.mark.parametrize("mask,warned", [(False, True), (True, False)])
def test_reset_position_ids_without_reset_attention_mask_warns(tmp_path, model_dir, mask, warned):
    r = resolved(tmp_path, model_dir, nproc_per_node=8, stage="pt", reset_position_ids=True,
                 reset_attention_mask=mask)
    rep = check(r, cluster_layout(r.cfg, env={}))
    assert rep.problems == []
    assert any("reset_position_ids has no effect without reset_attention_mask" in w for w in rep.warnings) == warned


def test_dataset_xor_processed_data_dir(tmp_path, model_dir):
    one(tmp_path, model_dir, r"are exclusive", processed_data_dir="/p")
    one(tmp_path, model_dir, r"neither dataset nor processed_data_dir", dataset=None)


def test_warmup_must_end_before_the_run(tmp_path, model_dir):
    one(tmp_path, model_dir, r"lr_warmup_iters: lr warmup \(100 iterations\) must be shorter than train_iters \(100\)",
        lr_warmup_iters=100, train_iters=100)
    one(tmp_path, model_dir, r"lr_warmup_fraction: lr warmup \(100 iterations\) must be shorter", lr_warmup_fraction=1.0,
        train_iters=100)
    assert problems(tmp_path, model_dir, lr_warmup_iters=100, train_iters=None, epochs=1) == []  # the trainer checks


def test_lora_settings(tmp_path, model_dir):
    r = resolved(tmp_path, model_dir, nproc_per_node=8, finetuning_type="lora", **{"lora-rank": 8},
                 lora_target="linear_qkv,linear_fc2")  # LLaMA-Factory's names, a comma list
    assert (r.cfg.lora_r, r.cfg.lora_alpha, r.cfg.lora_target_modules) == (8, 32.0, ["linear_qkv", "linear_fc2"])
    assert check(r, cluster_layout(r.cfg, env={})).problems == []
    refused(tmp_path, model_dir, r"m: `lora_r` = 0: must be >= 1", finetuning_type="lora", lora_r=0)
    refused(tmp_path, model_dir, r"m: `lora_alpha` = -1: must be > 0", finetuning_type="lora", lora_alpha=-1)
    one(tmp_path, model_dir, r"lora_target_modules = \[\]: empty", finetuning_type="lora", lora_target_modules=[])
    r = resolved(tmp_path, model_dir, nproc_per_node=8, finetuning_type="lora", lora_target="all")
    assert r.cfg.lora_target_modules == ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    refused(tmp_path, model_dir, r"`lora_dropout` = 1: must be in \[0, 1\)", finetuning_type="lora", lora_dropout=1)
    r = resolved(tmp_path, model_dir, nproc_per_node=8, finetuning_type="lora", ckpt_load_type=0)
    assert any("frozen base weights are random" in w for w in check(r, cluster_layout(r.cfg, env={})).warnings)


def test_ckpt_load_type_stage_handler(tmp_path, model_dir):
    one(tmp_path, model_dir, r"ckpt_load_type = 3", ckpt_load_type=3)
    one(tmp_path, model_dir, r"stage = 'rl'", stage="rl")
    one(tmp_path, model_dir, r"handler_name = 'AlpacaHandler'", **{"handler-name": "AlpacaHandler"})


def test_resume_needs_checkpoint(tmp_path, model_dir):
    one(tmp_path, model_dir, r"ckpt_load_type = 2 \(resume\) needs user_converted_ckpt_path", ckpt_load_type=2)
    save = tmp_path / "out" / "saved_checkpoints" / "iter_0000010"
    save.mkdir(parents=True)
    assert problems(tmp_path, model_dir, ckpt_load_type=2, train_auto_resume=True) == []


def test_checkpoint_layout_must_match(tmp_path, model_dir):
    ck = tmp_path / "ck"
    for r in range(2):
        (ck / "iter_0000001" / f"mp_rank_{r:02d}").mkdir(parents=True)
    (ck / "latest_checkpointed_iteration.txt").write_text("1")
    one(tmp_path, model_dir, r"checkpoint layout TP2 PP1 differs from the run's TP4 PP1; .*convert reshard --mg-dir",
        user_converted_ckpt_path=str(ck), ckpt_load_type=2)
    # weights only: resharded into the run's layout by the convert stage, not refused
    assert problems(tmp_path, model_dir, user_converted_ckpt_path=str(ck), ckpt_load_type=1) == []


def test_all_problems_reported_together(tmp_path, model_dir):
    ps = problems(tmp_path, model_dir, world=6, SEQ_LEN=9000, ckpt_load_type=5, stage="x")
    assert len(ps) == 4, ps


def test_bad_sizes_and_save_interval(tmp_path, model_dir):
    # value ranges are the schema's: refused (all together) when the config is resolved
    with pytest.raises(UserErrors) as ei:
        resolved(tmp_path, model_dir, **{"micro-batch-size": 0, "save-interval": 0})
    assert [p.split("cfg.yaml: ")[1] for p in ei.value.problems] == [
        "m: `micro_batch_size` = 0: must be >= 1", "m: `save_interval` = 0: must be >= 1"]


def test_missing_model_config_leaves_model_rules_unchecked(tmp_path):
    r = resolved(tmp_path, tmp_path / "nope", nproc_per_node=8)
    rep = check(r, cluster_layout(r.cfg, env={}))
    assert rep.problems == [] and len(rep.unchecked) == 3 and "not a directory" in rep.model_error


# ---- cluster layout sources ----------------------------------------------------------------------

def test_layout_modelarts_env(tmp_path, model_dir):
    r = resolved(tmp_path, model_dir, **{"global-batch-size": 64})
    env = {"MA_NUM_HOSTS": "4", "VC_TASK_INDEX": "2", "VC_WORKER_HOSTS": "h0,h1,h2,h3", "MA_NUM_GPUS": "8"}
    lay = cluster_layout(r.cfg, env=env)
    assert (lay.world_size, lay.nnodes, lay.nproc_per_node, lay.node_rank, lay.master_addr) == (32, 4, 8, 2, "h0")
    assert (lay.dp, lay.num_microbatches) == (8, 8)


def test_layout_vc_worker_num(tmp_path, model_dir):
    r = resolved(tmp_path, model_dir)
    lay = cluster_layout(r.cfg, env={"VC_WORKER_NUM": "2", "VC_TASK_INDEX": "1", "VC_WORKER_HOSTS": "a,b",
                                     "MA_NUM_GPUS": "4"})
    assert (lay.world_size, lay.node_rank, lay.master_addr, lay.dp) == (8, 1, "a", 2)


def test_layout_torchrun_env(tmp_path, model_dir):
    r = resolved(tmp_path, model_dir)
    env = {"MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "7000", "NNODES": "2", "NODE_RANK": "1",
           "ASCEND_RT_VISIBLE_DEVICES": "0,1,2,3", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    lay = cluster_layout(r.cfg.model_copy(update={"device": "npu"}), env=env)
    assert (lay.nnodes, lay.node_rank, lay.master_addr, lay.master_port, lay.nproc_per_node) == \
        (2, 1, "10.0.0.9", 7000, 4)


def test_layout_flags_beat_env(tmp_path, model_dir):
    r = resolved(tmp_path, model_dir, nproc_per_node=8)
    env = {"MA_NUM_HOSTS": "4", "VC_TASK_INDEX": "2", "VC_WORKER_HOSTS": "h0,h1,h2,h3", "MA_NUM_GPUS": "8"}
    lay = cluster_layout(r.cfg, {"master_addr": "10.0.0.1", "num_nodes": 2, "rank": 0}, env=env)
    assert (lay.nnodes, lay.node_rank, lay.master_addr, lay.world_size) == (2, 0, "10.0.0.1", 16)


def test_layout_single_node_default(tmp_path, model_dir):
    r = resolved(tmp_path, model_dir, **{"tensor-model-parallel-size": 1})
    lay = cluster_layout(r.cfg.model_copy(update={"device": "cpu"}), env={})
    assert (lay.nnodes, lay.node_rank, lay.nproc_per_node, lay.world_size, lay.device) == (1, 0, 1, 1, "cpu")


def test_scripts_dir_must_hold_train_sh(tmp_path, model_dir):
    one(tmp_path, model_dir, r"scripts_dir: .*/nowhere/train.sh not found", scirpts_dir=str(tmp_path / "nowhere"))
    custom = tmp_path / "my_scripts"
    custom.mkdir()
    (custom / "train.sh").write_text("exit 0\n")
    assert problems(tmp_path, model_dir, scripts_dir=str(custom)) == []


@pytest.mark.parametrize("flags,env,message", [
    ({}, {"NNODES": "0", "MASTER_ADDR": "10.0.0.1"}, "NNODES = 0: the number of nodes must be at least 1"),
    ({}, {"MA_NUM_HOSTS": "0"}, "MA_NUM_HOSTS = 0: the number of nodes must be at least 1"),
    ({"num_nodes": 0}, {}, "--num_nodes = 0: the number of nodes must be at least 1"),
    ({}, {"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "a"}, "NODE_RANK = 2: the node rank must be in 0..1"),
    ({}, {"MASTER_PORT": "70000"}, "MASTER_PORT = 70000: must be in [1, 65535]"),
    ({}, {"MA_NUM_HOSTS": "2", "MA_NUM_GPUS": "-1", "VC_WORKER_HOSTS": "a,b"}, "MA_NUM_GPUS = -1"),
    # a multi-node job without a usable master address would dial 127.0.0.1 on every node and hang
    ({}, {"MA_NUM_HOSTS": "2", "VC_TASK_INDEX": "1", "VC_WORKER_HOSTS": ""},
     "VC_WORKER_HOSTS = '': not a usable master address (2 node(s)); set VC_WORKER_HOSTS (or --master_addr)"),
    ({}, {"NNODES": "2", "MASTER_ADDR": ""}, "MASTER_ADDR = '': not a usable master address (2 node(s))"),
    ({"num_nodes": 2, "rank": 1}, {}, ("--master_addr = '': not a usable master address (2 node(s)); set "
                                       "--master_addr to the host name or IP of node 0")),
    ({"num_nodes": 2, "rank": 1, "master_addr": "_"}, {}, "--master_addr = '_': not a usable master address"),
    ({}, {"MASTER_ADDR": "_"}, "MASTER_ADDR = '_': not a usable master address (1 node(s))"),
])
def test_layout_refuses_bad_cluster_values(tmp_path, model_dir, flags, env, message):
    r = resolved(tmp_path, model_dir)  # devices per node from the env
    with pytest.raises(UserError) as ei:
        cluster_layout(r.cfg, flags, env=env)
    assert message in str(ei.value)


def test_layout_master_address_forms(tmp_path, model_dir):
    r = resolved(tmp_path, model_dir, nproc_per_node=4)
    # one node may leave it unset; two nodes on one machine (tests, Lite Server trials) may name 127.0.0.1
    assert cluster_layout(r.cfg, {}, env={"MASTER_ADDR": ""}).master_addr == "127.0.0.1"
    lay = cluster_layout(r.cfg, {"num_nodes": 2, "rank": 1, "master_addr": "127.0.0.1"}, env={})
    assert (lay.nnodes, lay.master_addr) == (2, "127.0.0.1")
    for host in ("job-1-worker-0.job-1", "10.0.0.9", "fe80::1"):
        assert cluster_layout(r.cfg, {}, env={"NNODES": "2", "MASTER_ADDR": host}).master_addr == host


@pytest.mark.parametrize("edit,message", [
    ({"num_attention_heads": 0}, "num_attention_heads = 0: must be a positive integer"),
    ({"num_hidden_layers": 0}, "num_hidden_layers = 0: must be a positive integer"),
    ({"num_key_value_heads": -2}, "num_key_value_heads = -2: must be a positive integer"),
    ({"num_hidden_layers": "28"}, 'num_hidden_layers = "28": must be a positive integer'),
    ({"num_hidden_layers": None}, "missing key 'num_hidden_layers'"),
    (None, "config.json: expected a JSON object of model settings, found a list"),
])
def test_broken_model_config_is_a_problem_not_unchecked(tmp_path, model_dir, edit, message):
    cfg = [QWEN2_7B] if edit is None else {**QWEN2_7B, **edit}
    (model_dir / "config.json").write_text(json.dumps(cfg))
    r = resolved(tmp_path, model_dir, nproc_per_node=8)
    rep = check(r, cluster_layout(r.cfg, env={}))
    assert len(rep.problems) == 1 and message in rep.problems[0] and not rep.unchecked, rep


def test_null_kv_heads_means_as_many_as_heads(tmp_path, model_dir):
    (model_dir / "config.json").write_text(json.dumps({**QWEN2_7B, "num_key_value_heads": None}))
    assert problems(tmp_path, model_dir) == []


def test_prompt_type_and_layer_list_entries(tmp_path, model_dir):
    one(tmp_path, model_dir, r"prompt_type = 'qwen3': unknown chat template; use one of auto, qwen", prompt_type="qwen3")
    with pytest.raises(UserError, match=r"num_layer_list = '14,0,14': every pipeline stage needs at least 1 layer"):
        problems(tmp_path, model_dir, world=12, **{"pipeline-model-parallel-size": 3, "global-batch-size": 63,
                                                   "num_layer_list": "14,0,14"})
