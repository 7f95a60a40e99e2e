"""Config resolution: merge order, key spellings, overrides, interpolation, unknown keys."""

import textwrap

import pytest

from ascendfactory.config.loader import list_experiments, parse_overrides, resolve
from ascendfactory.errors import UserError, UserErrors

DOC_STYLE = """
base:
  mount_type: SFS
  scirpts_dir: /opt/scripts
  micro-batch-size: 1
  global-batch-size: 64
  lr: 1.0e-5
  SEQ_LEN: 2048
  MAX_PE: 4096
  output_dir: /out/${model_name}/${exp_name}
  dataset: /data/alpaca.json
  train_iters: 10
qwen2-7b:
  model_name_or_path: /models/Qwen2-7B
  tensor-model-parallel-size: 4
  context_parallel_size: 1
  lr: 2.0e-5
  4096-sft-full:
    SEQ_LEN: 4096
    MAX_PE: 8192
    pipeline-model-parallel-size: 2
    Save-Interval: 5
    user_converted_ckpt_path: ${output_dir}/converted_hf2mg_weight_TP${tensor-model-parallel-size}PP${pipeline-model-parallel-size}
  8192-pt-full:
    stage: pt
    SEQ_LEN: 8192
llama3.1-8b:
  model_name_or_path: /models/llama
  4096-sft-full: {}
"""


def write(tmp_path, text, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_merge_order_and_spellings(tmp_path):
    p = write(tmp_path, DOC_STYLE)
    r = resolve(p, "qwen2-7b", "4096-sft-full")
    c = r.cfg
    assert c.mount_type == "SFS" and c.scripts_dir == "/opt/scripts"  # scirpts_dir accepted
    assert c.micro_batch_size == 1 and c.global_batch_size == 64
    assert c.lr == 2.0e-5  # model overrides base
    assert c.seq_len == 4096 and c.max_pe == 8192  # experiment overrides base
    assert c.tensor_model_parallel_size == 4 and c.pipeline_model_parallel_size == 2
    assert c.save_interval == 5  # mixed case + hyphen
    assert c.output_dir == "/out/qwen2-7b/4096-sft-full"
    assert c.user_converted_ckpt_path == "/out/qwen2-7b/4096-sft-full/converted_hf2mg_weight_TP4PP2"
    assert r.where("seq_len").endswith("qwen2-7b.4096-sft-full")
    assert r.where("lr").endswith("qwen2-7b")


def test_defaults_from_spec(tmp_path):
    p = write(tmp_path, "m:\n  model_name_or_path: /m\n  output_dir: /o\n  dataset: /d\n  e: {}\n")
    c = resolve(p, "m", "e").cfg
    assert (c.stage, c.finetuning_type, c.ckpt_load_type) == ("sft", "full", 1)
    assert (c.micro_batch_size, c.global_batch_size) == (4, 512)
    assert (c.tensor_model_parallel_size, c.pipeline_model_parallel_size, c.context_parallel_size) == (8, 1, 1)
    assert (c.lr, c.min_lr, c.seq_len, c.max_pe) == (2.5e-5, 2.5e-6, 4096, 8192)
    assert (c.train_iters, c.save_interval, c.save_total_limit, c.seed) == (100, 1000, 0, 1234)
    assert c.convert_mg2hf_at_last is True and c.train_auto_resume is False
    assert c.handler_name == "AlpacaStyleInstructionHandler" and c.mount_type == "OBS"


def test_command_line_overrides_win(tmp_path):
    p = write(tmp_path, DOC_STYLE)
    r = resolve(p, "qwen2-7b", "4096-sft-full", [
        "--lr=3e-5", "--SEQ_LEN", "1024", "--backend_config.training.train-iters=7",
        "--extra_args.use_flash_attn=true", "--extra_args.nested.level=2", "--train_auto_resume",
    ])
    c = r.cfg
    assert c.lr == 3e-5 and c.seq_len == 1024 and c.train_iters == 7
    assert c.extra_args == {"use_flash_attn": True, "nested": {"level": 2}}
    assert c.train_auto_resume is True
    assert r.where("lr") == "command line"


def test_override_values_are_yaml_scalars():
    assert parse_overrides(["--a=1", "--b=true", "--c=1.5", "--d=x,y", "--e=[1, 2]"]) == [
        (["a"], 1), (["b"], True), (["c"], 1.5), (["d"], "x,y"), (["e"], [1, 2])]


def test_grouped_keys_and_group_interpolation(tmp_path):
    p = write(tmp_path, """
        base:
          backend_config:
            training: {lr: 4.0e-5, micro-batch-size: 2}
          min_lr: ${backend_config.training.lr}
        m:
          model_name_or_path: /m
          output_dir: /o
          dataset: /d
          e: {}
    """)
    c = resolve(p, "m", "e").cfg
    assert c.lr == 4.0e-5 and c.micro_batch_size == 2 and c.min_lr == 4.0e-5


def test_interpolation_keeps_type_and_chains(tmp_path):
    p = write(tmp_path, """
        m:
          model_name_or_path: /m
          output_dir: /o
          dataset: /d
          global_batch_size: ${micro_batch_size}
          micro_batch_size: ${seed}
          seed: 8
          hf_save_dir: ${output_dir}/hf
          e: {}
    """)
    c = resolve(p, "m", "e").cfg
    assert c.global_batch_size == 8 and c.micro_batch_size == 8 and c.hf_save_dir == "/o/hf"


def test_interpolation_cycle_is_an_error(tmp_path):
    p = write(tmp_path, "m:\n  model_name_or_path: ${output_dir}\n  output_dir: ${model_name_or_path}\n"
                        "  dataset: /d\n  e: {}\n")
    with pytest.raises(UserError, match="cycle"):
        resolve(p, "m", "e")


def test_interpolation_missing_key_is_an_error(tmp_path):
    p = write(tmp_path, "m:\n  model_name_or_path: /m\n  output_dir: ${work_root}/x\n  dataset: /d\n  e: {}\n")
    with pytest.raises(UserError, match=r"output_dir.*\$\{work_root\}"):
        resolve(p, "m", "e")


def test_unknown_keys_all_reported_with_suggestions(tmp_path):
    p = write(tmp_path, "m:\n  model_name_or_path: /m\n  output_dir: /o\n  dataset: /d\n"
                        "  micro_bach_size: 2\n  e:\n    learning_rat: 1\n    extra_args: {anything: 1}\n")
    with pytest.raises(UserErrors) as ei:
        resolve(p, "m", "e")
    text = str(ei.value)
    assert "micro_bach_size" in text and "did you mean `micro_batch_size`" in text
    assert "learning_rat" in text
    assert "anything" not in text  # extra_args passes through


def test_wrong_value_type_names_key(tmp_path):
    p = write(tmp_path, "m:\n  model_name_or_path: /m\n  output_dir: /o\n  dataset: /d\n  e:\n"
                        "    micro-batch-size: lots\n")
    with pytest.raises(UserErrors, match=r"micro_batch_size.*'lots'"):
        resolve(p, "m", "e")


def test_missing_required_key(tmp_path):
    p = write(tmp_path, "m:\n  output_dir: /o\n  dataset: /d\n  e: {}\n")
    with pytest.raises(UserErrors, match="model_name_or_path"):
        resolve(p, "m", "e")


def test_unknown_model_and_experiment_list_available(tmp_path):
    p = write(tmp_path, DOC_STYLE)
    with pytest.raises(UserError, match=r"qwen2-7\b.*did you mean `qwen2-7b`.*available: qwen2-7b, llama3.1-8b"):
        resolve(p, "qwen2-7", "4096-sft-full")
    with pytest.raises(UserError, match=r"available: 4096-sft-full, 8192-pt-full"):
        resolve(p, "qwen2-7b", "4096-sft")


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    p = write(tmp_path, "m:\n  model_name_or_path: /m\n  e: [1, 2\n")
    with pytest.raises(UserError, match=r"cfg.yaml:\d+:\d+: YAML syntax error"):
        resolve(p, "m", "e")


def test_list_experiments(tmp_path):
    p = write(tmp_path, DOC_STYLE)
    assert list_experiments(p) == {"qwen2-7b": ["4096-sft-full", "8192-pt-full"], "llama3.1-8b": ["4096-sft-full"]}


MINIMAL = "m:\n  model_name_or_path: /m\n  output_dir: /o\n  dataset: /d\n  e: {}\n"


def laughs(levels: int, width: int) -> str:
    """A billion-laughs document under extra_args: width ** levels values from a few lines."""
    lines = [f"  l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "extra_args:\n" + "\n".join(lines) + "\n"


@pytest.mark.parametrize("levels,width", [(6, 10), (9, 9)])  # 10^6 values; the classic 9^9 (387 million)
def test_alias_bomb_is_refused(tmp_path, levels, width):
    p = write(tmp_path, MINIMAL + laughs(levels, width))
    with pytest.raises(UserError, match=r"cfg.yaml: the YAML expands to more than 100000 values through aliases"):
        resolve(p, "m", "e")


def test_recursive_alias_is_refused(tmp_path):
    p = write(tmp_path, MINIMAL + "extra_args:\n  loop: &a [1, *a]\n")
    with pytest.raises(UserError, match=r"cfg.yaml:7: a YAML alias refers to the value that contains it"):
        resolve(p, "m", "e")


def test_ordinary_anchors_and_merge_keys_still_work(tmp_path):
    p = write(tmp_path, """
        common: &common {lr: 1.0e-5, seed: 3}
        m:
          model_name_or_path: /m
          output_dir: /o
          dataset: /d
          e:
            <<: *common
            lr: 2.0e-5
            extra_args: {a: *common, b: *common}
    """)
    c = resolve(p, "m", "e").cfg
    assert (c.lr, c.seed, c.extra_args["b"]) == (2.0e-5, 3, {"lr": 1.0e-5, "seed": 3})


def test_duplicate_keys_and_blocks_name_both_lines(tmp_path):
    p = write(tmp_path, """
        base:
          SEQ_LEN: 64
          micro-batch-size: 1
          seq_len: 128
          mbs: 2
        m:
          model_name_or_path: /m
          e: {extra_args: {Flag: 1, flag: 2}}
        m:
          e: {}
    """)
    with pytest.raises(UserErrors) as ei:
        resolve(p, "m", "e")
    assert ei.value.problems == [
        f"{p}:5: duplicate key `seq_len` (already written as `SEQ_LEN` at {p}:3); keep one of them",
        f"{p}:6: duplicate key `mbs` (already written as `micro-batch-size` at {p}:4); keep one of them",
        f"{p}:10: duplicate block `m` (already written at {p}:7); keep one of them",
    ]  # extra_args keys go to the trainer as written: Flag and flag are two keys


def test_value_ranges_one_line_per_key_with_the_block(tmp_path):
    p = write(tmp_path, MINIMAL + "base:\n  lr: .nan\n  adam_beta2: 1\n  master_port: 0\n  seed: -1\n")
    with pytest.raises(UserErrors) as ei:
        resolve(p, "m", "e", ["--log_interval=0", "--extra_args.loss_scale=-.inf"])
    assert sorted(ei.value.problems) == sorted([
        f"{p}: base: `lr` = nan: must be a finite number >= 0",
        f"{p}: base: `adam_beta2` = 1: must be in [0, 1)",
        f"{p}: base: `master_port` = 0: must be in [1, 65535]",
        f"{p}: base: `seed` = -1: must be in [0, 2147483647]",
        "command line: `log_interval` = 0: must be >= 1",
        ("command line: `extra_args` = {'loss_scale': -inf}: extra_args.loss_scale is not a finite number; "
         "write a number"),
    ])


def test_bare_flag_is_true_only_for_switches(tmp_path):
    p = write(tmp_path, MINIMAL)
    assert resolve(p, "m", "e", ["--pack"]).cfg.pack is True
    with pytest.raises(UserErrors, match=r"command line: `seq_len` = True: must be a number, not true/false"):
        resolve(p, "m", "e", ["--seq_len"])


def test_dotted_override_needs_a_group_of_the_yaml(tmp_path):
    p = write(tmp_path, MINIMAL.replace("  e: {}", "  e:\n    training: {lr: 1.0e-5}"))
    assert resolve(p, "m", "e", ["--training.lr=3e-5"]).cfg.lr == 3e-5
    with pytest.raises(UserErrors, match=r"`--anything.seed`: .*cfg.yaml has no group `anything`; write --seed="):
        resolve(p, "m", "e", ["--anything.seed=5"])


def test_interpolation_cannot_grow_a_value_without_bound(tmp_path):
    doubling = "".join(f"  a{i}: ${{a{i - 1}}}${{a{i - 1}}}\n" for i in range(1, 40))
    p = write(tmp_path, MINIMAL + "extra_args:\n  a0: xxxxxxxxxx\n" + doubling.replace("${a", "${extra_args.a"))
    with pytest.raises(UserError, match=r"`extra_args` grows to more than 100000 characters through \$\{\.\.\.\}"):
        resolve(p, "m", "e")
