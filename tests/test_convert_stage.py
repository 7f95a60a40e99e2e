"""The pipeline's convert / export stages: skip rules, fingerprint, fast torch-free decisions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ascendfactory.config.paths import run_paths
from ascendfactory.config.schema import ExpConfig
from ascendfactory.convert.stage import decide_convert, decide_export, run_convert, run_export
from ascendfactory.errors import UserError


def make_cfg(model: Path, out: Path, **kw) -> ExpConfig:
    return ExpConfig(model_name_or_path=str(model), output_dir=str(out), tensor_model_parallel_size=2,
                     pipeline_model_parallel_size=2, **kw)


def test_convert_stage_skips(tiny_models, tmp_path):
    model = Path(shutil.copytree(tiny_models["qwen2"], tmp_path / "model"))
    cfg = make_cfg(model, tmp_path / "out")
    paths = run_paths(cfg)
    assert decide_convert(cfg.model_copy(update={"ckpt_load_type": 0}), paths)[0] is False
    given = cfg.model_copy(update={"user_converted_ckpt_path": str(tmp_path / "mine")})
    assert decide_convert(given, run_paths(given)) == (False, f"using user_converted_ckpt_path {tmp_path / 'mine'}")
    run, why = decide_convert(cfg, paths)
    assert run and "TP2 PP2" in why
    run_convert(cfg, paths)
    assert paths.converted_ckpt_dir.name == "converted_hf2mg_weight_TP2PP2"
    assert decide_convert(cfg, paths) == (False, f"{paths.converted_ckpt_dir} already holds this conversion of {model}")
    # another layer split, then a changed source: both make the conversion stale; it is ours, so it is redone
    uneven = cfg.model_copy(update={"num_layer_list": "1,3"})
    assert decide_convert(uneven, run_paths(uneven))[0]
    st = (model / "model.safetensors").stat()
    os.utime(model / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert decide_convert(cfg, paths)[0]
    run_convert(cfg, paths)
    assert decide_convert(cfg, paths)[0] is False
    # a deleted rank file is noticed without reading any checkpoint
    next(paths.converted_ckpt_dir.rglob("model_optim_rng.pt")).unlink()
    assert decide_convert(cfg, paths)[0]


def test_decisions_are_torch_free(tiny_models, tmp_path):
    cfg = make_cfg(tiny_models["llama"], tmp_path / "out")
    code = (
        "import json, sys\n"
        "from ascendfactory.config.schema import ExpConfig\n"
        "from ascendfactory.config.paths import run_paths\n"
        "from ascendfactory.convert.stage import decide_convert, decide_export\n"
        f"cfg = ExpConfig.model_validate(json.loads({cfg.model_dump_json()!r}))\n"
        "d = decide_convert(cfg, run_paths(cfg)), decide_export(cfg, run_paths(cfg))\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'd': d}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["torch"] is False and out["d"][0][0] and out["d"][1][0], out


def test_export_stage(tiny_models, tmp_path):
    import transformers

    model = tiny_models["qwen3"]  # bf16 source: the export keeps its dtype
    cfg = make_cfg(model, tmp_path / "out")
    paths = run_paths(cfg)
    off = cfg.model_copy(update={"convert_mg2hf_at_last": False})
    assert decide_export(off, paths) == (False, "convert_mg2hf_at_last is false")
    # the "final training checkpoint": a fp32 TP2 PP2 checkpoint saved at iteration 1
    from ascendfactory.convert.api import hf_to_megatron

    hf_to_megatron(model, paths.save_dir, 2, 2, dtype="fp32")
    assert decide_export(cfg, paths)[0]
    run_export(cfg, paths)
    assert decide_export(cfg, paths) == (False, f"{paths.hf_save_dir} already holds the export of iteration 1")
    out = {}
    for f in paths.hf_save_dir.glob("*.safetensors"):
        out.update(load_file(f))
    src = load_file(model / "model.safetensors")
    assert sorted(out) == sorted(src) and all(torch.equal(out[k], src[k]) for k in src)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(paths.hf_save_dir))
    assert loaded.dtype == torch.bfloat16
    assert transformers.AutoTokenizer.from_pretrained(str(paths.hf_save_dir)).chat_template


def test_foreign_targets_are_refused_at_plan_time(tiny_models, tmp_path):
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "weights.txt").write_text("precious")
    cfg = make_cfg(tiny_models["llama"], tmp_path / "out", hf_save_dir=str(user_dir))
    paths = run_paths(cfg)
    with pytest.raises(UserError, match="hf_save_dir .*mine: folder is not empty"):
        decide_export(cfg, paths)
    paths.converted_ckpt_dir.mkdir(parents=True)
    (paths.converted_ckpt_dir / "x.pt").write_text("")
    with pytest.raises(UserError, match="converted checkpoint dir"):
        decide_convert(cfg, paths)
    assert (user_dir / "weights.txt").read_text() == "precious"
