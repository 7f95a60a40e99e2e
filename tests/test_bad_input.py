"""Bad input, one row each: exit code 2, one clear line naming the key or file, no traceback,
and none of the user's files changed or deleted."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ascendfactory import tiny


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    tiny.make_tiny_model(root / "user" / "model", "qwen2")
    tiny.write_instruction_data(root / "user" / "data.jsonl", n=16)
    return root


def good_config(root: Path) -> dict:
    return {"base": {"device": "cpu", "nproc_per_node": 2, "SEQ_LEN": 64, "MAX_PE": 256, "micro-batch-size": 1,
                     "global-batch-size": 4, "train-iters": 2, "tensor-model-parallel-size": 1,
                     "prompt_type": "qwen"},
            "tiny": {"model_name_or_path": str(root / "user" / "model"), "dataset": str(root / "user" / "data.jsonl"),
                     "output_dir": str(root / "out"), "exp": {}}}


def snapshot(root: Path) -> dict:
    out = {}
    for p in sorted((root / "user").rglob("*")):
        if p.is_file():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def make_ckpt(path: Path, tp: int, tracker: str | None = "1", iters=(1,)) -> Path:
    for it in iters:
        for r in range(tp):
            d = path / f"iter_{it:07d}" / f"mp_rank_{r:02d}"
            d.mkdir(parents=True, exist_ok=True)
            (d / "model_optim_rng.pt").write_bytes(b"x")
    if tracker is not None:
        (path / "latest_checkpointed_iteration.txt").write_text(tracker)
    return path


def _mutate(root: Path, cfg: dict, case: str) -> tuple[list[str], str]:
    """Apply one bad-input case; return (extra CLI args, expected text in the error)."""
    exp, model = cfg["tiny"]["exp"], cfg["tiny"]
    user = root / "user"
    simple = {
        "wrong_type": ({"micro-batch-size": "lots"}, "micro_batch_size"),
        "unknown_key": ({"micro_bach_size": 2}, "did you mean `micro_batch_size`"),
        "tp_pp_cp_world": ({"context_parallel_size": 4}, "must divide the world size 2"),
        "tp_cp_heads": ({"nproc_per_node": 3, "tensor-model-parallel-size": 3}, "must divide num_attention_heads"),
        "kv_heads_tp": ({"nproc_per_node": 4, "tensor-model-parallel-size": 4, "global-batch-size": 4},
                        "num_key_value_heads (2"),
        "layers_pp": ({"nproc_per_node": 3, "pipeline-model-parallel-size": 3}, "num_hidden_layers (4"),
        "gbs_mbs_dp": ({"global-batch-size": 3}, "global_batch_size (3) must be divisible"),
        "seq_gt_max_pe": ({"SEQ_LEN": 512}, "seq_len (512) must be <= max_pe (256)"),
        "seq_cp": ({"context_parallel_size": 2, "SEQ_LEN": 66}, "2 x context_parallel_size"),
        "seq_sp": ({"tensor-model-parallel-size": 2, "sequence_parallel": True, "SEQ_LEN": 65},
                   "seq_len (65) must be divisible by tensor_model_parallel_size x context_parallel_size (2)"),
        "device_missing": ({"device": "npu"}, "device: npu requested but torch_npu sees no NPU"),
        "data_and_processed": ({"processed_data_dir": str(user)}, "are exclusive"),
        "no_data": ({"dataset": None}, "neither dataset nor processed_data_dir"),
        "load_type": ({"ckpt_load_type": 5}, "ckpt_load_type = 5"),
        "stage": ({"stage": "rl"}, "stage = 'rl'"),
        "lora_targets": ({"finetuning_type": "lora", "lora_target_modules": "linear_qkv q_proj"},
                         "lora_target_modules = ['linear_qkv', 'q_proj']: unknown q_proj; choose from linear_qkv, "
                         "linear_proj, linear_fc1, linear_fc2 (or all) (q_proj is in linear_qkv: megatron-core fuses "
                         "them)"),
        "handler": ({"handler-name": "AlpacaHandler"}, "handler_name = 'AlpacaHandler'"),
        "resume_without_ckpt": ({"ckpt_load_type": 2}, "ckpt_load_type = 2 (resume) needs"),
        "save_interval": ({"save-interval": 0}, "`save_interval` = 0: must be >= 1"),
        # every value range, refused before any stage with the key as written in the YAML and the allowed range
        "master_port": ({"master_port": 70000}, "tiny.exp: `master_port` = 70000: must be in [1, 65535]"),
        "grace_nan": ({"save_grace_period": float("nan")}, "`save_grace_period` = nan: must be a finite number >= 0"),
        "nproc_zero": ({"nproc_per_node": 0}, "`nproc_per_node` = 0: must be >= 1"),
        "max_restarts": ({"max_restarts": -1}, "`max_restarts` = -1: must be >= 0"),
        "lr_nan": ({"lr": float("nan")}, "`lr` = nan: must be a finite number >= 0"),
        "lr_negative": ({"lr": -1e-5}, "`lr` = -1e-05: must be >= 0"),
        "warmup_negative": ({"lr_warmup_iters": -5}, "`lr_warmup_iters` = -5: must be >= 0"),
        "adam_beta": ({"adam_beta2": 1.0}, "`adam_beta2` = 1.0: must be in [0, 1)"),
        "clip_grad": ({"clip_grad": -1.0}, "`clip_grad` = -1.0: must be >= 0"),
        "weight_decay": ({"weight_decay": -0.1}, "`weight_decay` = -0.1: must be >= 0"),
        "epochs_zero": ({"epochs": 0}, "`epochs` = 0: must be > 0"),
        "prompt_type": ({"prompt_type": "qwen3"}, "prompt_type = 'qwen3': unknown chat template"),
        "layer_list_zero": ({"pipeline-model-parallel-size": 2, "num_layer_list": "4,0"},
                            "num_layer_list = '4,0': every pipeline stage needs at least 1 layer"),
        "extra_args_inf": ({"extra_args": {"loss_scale": float("inf")}}, "extra_args.loss_scale is not a finite number"),
        "min_lr_gt_lr": ({"lr": 1e-5, "min-lr": 1e-3}, "min_lr"),
        "layer_list_len": ({"num_layer_list": "1,1,2"}, "num_layer_list (1,1,2) has 3 entries"),
        "missing_model_dir": ({"model_name_or_path": str(root / "nope")}, "is not a directory"),
        "dataset_missing": ({"dataset": str(user / "missing.jsonl")}, "missing.jsonl"),
    }
    if case in simple:
        keys, expect = simple[case]
        for k, v in keys.items():
            if v is None:
                model.pop(k, None)
            else:
                exp[k] = v
        return [], expect
    if case in CLI_CASES:
        return CLI_CASES[case]
    if case in YAML_EDITS:
        old, new, expect = YAML_EDITS[case]
        return ["__yaml_edit__", old, new], expect
    if case in ENV_CASES:
        return [], ENV_CASES[case][1]
    if case in MODEL_CONFIGS:
        edit, expect = MODEL_CONFIGS[case]
        d = user / f"model_{case}"
        if not d.exists():
            shutil.copytree(user / "model", d)
            (d / "config.json").write_text(json.dumps(edit(json.loads((d / "config.json").read_text()))))
        exp["model_name_or_path"] = str(d)
        return [], expect
    if case == "missing_model_key":
        model.pop("model_name_or_path")
        return [], "model_name_or_path"
    if case == "no_config_json":
        d = user / "model_noconfig"
        if not d.exists():
            shutil.copytree(user / "model", d)
            (d / "config.json").unlink()
        exp["model_name_or_path"] = str(d)
        return [], "config.json"
    if case == "unsupported_arch":
        d = user / "model_gpt2"
        if not d.exists():
            shutil.copytree(user / "model", d)
            c = json.loads((d / "config.json").read_text())
            c["architectures"] = ["GPT2LMHeadModel"]
            (d / "config.json").write_text(json.dumps(c))
        exp["model_name_or_path"] = str(d)
        return [], "unsupported architecture"
    if case == "rope_yarn":  # converts fine, but training would not reproduce it: refused before any stage
        d = user / "model_yarn"
        if not d.exists():
            shutil.copytree(user / "model", d)
            c = json.loads((d / "config.json").read_text())
            c["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
            (d / "config.json").write_text(json.dumps(c))
        exp["model_name_or_path"] = str(d)
        return [], "rope_scaling type 'yarn' is not supported for training"
    if case == "no_tokenizer":
        d = user / "model_notok"
        if not d.exists():
            d.mkdir()
            for f in ("config.json", "model.safetensors", "generation_config.json"):
                shutil.copy(user / "model" / f, d / f)
        exp["model_name_or_path"] = str(d)
        return [], "tokenizer"
    if case == "dataset_empty":
        (user / "empty.jsonl").write_text("")
        exp["dataset"] = str(user / "empty.jsonl")
        return [], "empty.jsonl"
    if case == "dataset_malformed":
        (user / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
        exp["dataset"] = str(user / "bad.jsonl")
        return [], "bad.jsonl:2"
    if case == "processed_dir_empty":
        d = user / "processed"
        d.mkdir(exist_ok=True)
        model.pop("dataset")
        exp["processed_data_dir"] = str(d)
        return [], "processed"
    if case == "ckpt_no_tracker":
        exp["user_converted_ckpt_path"] = str(make_ckpt(user / "ck_notracker", 1, tracker=None))
        return [], "tracker file missing"
    if case == "ckpt_tracker_missing_iter":
        exp["user_converted_ckpt_path"] = str(make_ckpt(user / "ck_missing_iter", 1, tracker="20"))
        return [], "names iteration 20"
    if case == "ckpt_layout":
        exp.update({"user_converted_ckpt_path": str(make_ckpt(user / "ck_tp2", 2)), "ckpt_load_type": 2})
        return [], "checkpoint layout TP2 PP1 differs from the run's TP1 PP1"
    if case == "resume_from_weights":  # converted weights hold no optimizer state: found before any stage runs
        ck = user / "ck_weights"
        if not ck.exists():
            from ascendfactory.convert.api import hf_to_megatron

            hf_to_megatron(user / "model", ck, tp=1, pp=1)
        exp.update({"user_converted_ckpt_path": str(ck), "ckpt_load_type": 2})
        return [], "no 'optimizer' (weights only, e.g. converted HF weights); use ckpt_load_type 1"
    if case == "output_not_writable":
        (user / "a_file").write_text("x")
        exp["output_dir"] = str(user / "a_file" / "out")
        return [], "output_dir"
    if case == "yaml_syntax":
        return ["__yaml_syntax__"], "YAML syntax error"
    if case == "unknown_model":
        return ["__model__", "tiny2"], "did you mean `tiny`"
    if case == "unknown_exp":
        return ["__exp__", "expp"], "available: exp"
    if case == "override_type":
        return ["--seed=abc"], "seed"
    raise AssertionError(case)


CLI_CASES = {  # (command-line arguments, expected error text)
    "log_interval_cli": (["--log_interval=0"], "command line: `log_interval` = 0: must be >= 1"),
    "bare_seq_len": (["--seq_len"], "command line: `seq_len` = True: must be a number, not true/false"),
    "dotted_seed": (["--anything.seed=5"], "has no group `anything`; write --seed="),
    "master_underscore": (["--master_addr", "_", "--num_nodes", "2", "--rank", "0"],
                          "--master_addr = '_': not a usable master address (2 node(s))"),
}
BOMB = "".join(f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}' if i else 'x'] * 10)}]\n" for i in range(6))
YAML_EDITS = {  # (text replaced, by, expected error text); an empty text appends
    "dup_key": ("  SEQ_LEN: 64\n", "  SEQ_LEN: 64\n  seq_len: 128\n", ("duplicate key `seq_len` (already written "
                                                                            "as `SEQ_LEN` at ")),
    "dup_block": ("", "tiny:\n  model_name_or_path: /x\n  exp: {}\n", "duplicate block `tiny` (already written at "),
    "alias_bomb": ("", "extra_args:\n" + BOMB, "expands to more than 100000 values through aliases"),
}
ENV_CASES = {  # (environment, expected error text)
    "nnodes_zero": ({"NNODES": "0"}, "NNODES = 0: the number of nodes must be at least 1"),
    "modelarts_no_hosts": ({"MA_NUM_HOSTS": "2", "VC_TASK_INDEX": "1", "VC_WORKER_HOSTS": ""},
                           "VC_WORKER_HOSTS = '': not a usable master address (2 node(s))"),
    "master_empty": ({"NNODES": "2", "MASTER_ADDR": ""}, "MASTER_ADDR = '': not a usable master address"),
}
MODEL_CONFIGS = {  # (config.json edit, expected error text)
    "heads_zero": (lambda c: {**c, "num_attention_heads": 0}, "num_attention_heads = 0: must be a positive integer"),
    "layers_zero": (lambda c: {**c, "num_hidden_layers": 0}, "num_hidden_layers = 0: must be a positive integer"),
    "config_list": (lambda c: [c], "config.json: expected a JSON object of model settings, found a list"),
}

CASES = [
    "yaml_syntax", "unknown_model", "unknown_exp", "wrong_type", "unknown_key", "override_type",
    "tp_pp_cp_world", "tp_cp_heads", "kv_heads_tp", "layers_pp", "gbs_mbs_dp", "seq_gt_max_pe", "seq_cp", "seq_sp", "device_missing",
    "data_and_processed", "no_data", "load_type", "stage", "lora_targets", "handler", "resume_without_ckpt", "save_interval",
    "min_lr_gt_lr", "layer_list_len", "missing_model_key", "missing_model_dir", "no_config_json",
    "unsupported_arch", "rope_yarn", "no_tokenizer", "dataset_missing", "dataset_empty", "dataset_malformed",
    "processed_dir_empty", "ckpt_no_tracker", "ckpt_tracker_missing_iter", "ckpt_layout", "resume_from_weights",
    "output_not_writable",
    "master_port", "grace_nan", "nproc_zero", "max_restarts", "lr_nan", "lr_negative", "warmup_negative", "adam_beta",
    "clip_grad", "weight_decay", "epochs_zero", "extra_args_inf", "prompt_type", "layer_list_zero", *CLI_CASES, *YAML_EDITS, *ENV_CASES,
    *MODEL_CONFIGS,
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input(assets, case, tmp_path):
    root = assets
    cfg = good_config(root)
    extra, expect = _mutate(root, cfg, case)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    model_name, exp_name = "tiny", "exp"
    if extra[:1] == ["__yaml_syntax__"]:
        cfg_path.write_text(cfg_path.read_text() + "broken: [1, 2\n")
        extra = []
    elif extra[:1] == ["__model__"]:
        model_name, extra = extra[1], []
    elif extra[:1] == ["__exp__"]:
        exp_name, extra = extra[1], []
    elif extra[:1] == ["__yaml_edit__"]:
        text = cfg_path.read_text()
        old, new = extra[1:]
        assert old in text
        cfg_path.write_text(text.replace(old, new, 1) if old else text + new)
        extra = []
    before = snapshot(root)
    r = subprocess.run([sys.executable, "-m", "ascendfactory", "train", str(cfg_path), model_name, exp_name, *extra],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "MASTER_PORT": "29731", **ENV_CASES.get(case, ({},))[0]})
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors and any(expect in line for line in errors), r.stderr
    assert snapshot(root) == before
    assert not (root / "out" / "saved_checkpoints").exists()
