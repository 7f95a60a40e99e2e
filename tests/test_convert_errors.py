"""Bad input to `convert`: exit 2, one clear line, nothing written or overwritten."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from ascendfactory.ckpt.files import TRACKER, rank_file
from ascendfactory.cli import main
from ascendfactory.convert.api import hf_to_megatron


def cli_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(["convert", *map(str, argv)])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def hf2mg(capsys, src, dst, *extra):
    return cli_error(capsys, "hf2mg", "--hf-dir", src, "--mg-dir", dst, *extra)


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def model_copy(tiny_models, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_models["llama"], tmp_path / "model"))


def test_missing_config_and_weights(capsys, model_copy, tmp_path):
    (model_copy / "model.safetensors").unlink()
    assert "no *.safetensors weights" in hf2mg(capsys, model_copy, tmp_path / "mg")
    (model_copy / "config.json").unlink()
    assert "config.json not found" in hf2mg(capsys, model_copy, tmp_path / "mg")
    assert not (tmp_path / "mg").exists()


def test_unsupported_architecture(capsys, model_copy, tmp_path):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (model_copy / "config.json").write_text(json.dumps(cfg))
    msg = hf2mg(capsys, model_copy, tmp_path / "mg")
    assert "unsupported architecture" in msg and "Qwen2ForCausalLM" in msg and "LlamaForCausalLM" in msg


@pytest.mark.parametrize("extra,needle", [
    (["--tp", "3"], "does not divide num_attention_heads=4"),
    (["--tp", "4"], "does not divide num_key_value_heads=2"),
    (["--pp", "3"], "does not divide num_hidden_layers=4"),
    (["--pp", "2", "--num-layer-list", "1,2"], "summing to num_hidden_layers=4"),
    (["--num-layer-list", "a,b"], "not a comma-separated list"),
    (["--dtype", "int8"], "unknown dtype"),
])
def test_bad_layout(capsys, tiny_models, tmp_path, extra, needle):
    assert needle in hf2mg(capsys, tiny_models["llama"], tmp_path / "mg", *extra)
    assert not (tmp_path / "mg").exists()


def test_weights_not_matching_config(capsys, model_copy, tmp_path):
    w = load_file(model_copy / "model.safetensors")
    del w["model.layers.3.mlp.up_proj.weight"]
    save_file(w, model_copy / "model.safetensors", metadata={"format": "pt"})
    assert "model.layers.3.mlp.up_proj.weight missing" in hf2mg(capsys, model_copy, tmp_path / "mg")
    assert not (tmp_path / "mg").exists()


def test_target_holding_other_content_is_not_touched(capsys, tiny_models, tmp_path):
    mg = tmp_path / "mg"
    hf_to_megatron(tiny_models["llama"], mg, 1, 2)
    before = snapshot(mg)
    assert "holds a different conversion" in hf2mg(capsys, tiny_models["llama"], mg, "--tp", "2")
    assert "holds a different conversion" in hf2mg(capsys, tiny_models["qwen2"], mg, "--pp", "2")
    assert snapshot(mg) == before
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    assert "not empty" in hf2mg(capsys, tiny_models["llama"], user)
    out = cli_error(capsys, "mg2hf", "--mg-dir", mg, "--hf-dir", user, "--hf-config-dir", tiny_models["llama"])
    assert "not empty" in out
    assert [p.name for p in user.iterdir()] == ["notes.txt"]


def test_bad_megatron_dirs(capsys, tiny_models, tmp_path):
    src = tiny_models["llama"]
    mg = tmp_path / "mg"
    hf_to_megatron(src, mg, 2, 2)

    def mg2hf(*extra):
        return cli_error(capsys, "mg2hf", "--mg-dir", mg, "--hf-dir", tmp_path / "hf", "--hf-config-dir", src,
                         *extra)

    assert "--shard-size" in mg2hf("--shard-size", "lots")
    assert "architecture Qwen2ForCausalLM" in cli_error(
        capsys, "mg2hf", "--mg-dir", mg, "--hf-dir", tmp_path / "hf", "--hf-config-dir", tiny_models["qwen2"])
    assert "iteration folder missing" in mg2hf("--iteration", "5")
    rank_file(mg, 1, 1, 1, 2).unlink()
    assert "mp_rank_01_001/model_optim_rng.pt: rank file missing" in mg2hf()
    (mg / TRACKER).unlink()
    assert "tracker file missing" in mg2hf()
    assert "does not exist" in cli_error(capsys, "mg2hf", "--mg-dir", tmp_path / "nope", "--hf-dir",
                                         tmp_path / "hf", "--hf-config-dir", src)
    assert not (tmp_path / "hf").exists()


def test_exit_code_of_the_real_command(tiny_models, tmp_path):
    r = subprocess.run([sys.executable, "-m", "ascendfactory", "convert", "hf2mg", "--hf-dir",
                        str(tiny_models["qwen3"]), "--mg-dir", str(tmp_path / "mg"), "--tp", "3"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: --tp: 3 does not divide"), r.stderr
    assert "Traceback" not in r.stderr


def test_config_not_fitting_the_checkpoint_leaves_nothing(capsys, tiny_models, tmp_path):
    mg = tmp_path / "mg"
    hf_to_megatron(tiny_models["llama"], mg, 2, 1)
    other = Path(shutil.copytree(tiny_models["llama"], tmp_path / "other"))
    cfg = json.loads((other / "config.json").read_text())
    cfg["num_key_value_heads"] = 4  # same architecture and sizes, different attention grouping
    (other / "config.json").write_text(json.dumps(cfg))
    msg = cli_error(capsys, "mg2hf", "--mg-dir", mg, "--hf-dir", tmp_path / "hf", "--hf-config-dir", other)
    assert "linear_qkv.weight does not fit" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mg", "other"]  # no output, no staging folder left
