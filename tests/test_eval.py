"""Validation while training (issue 14): the held-out split, the validation loss against transformers and across
layouts, training bit-identical with and without evaluation, exact resume, the best-checkpoint export through the
pipeline with a separate eval_dataset, and bad validation keys refused by `plan`."""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import _engine as E
import numpy as np
import pytest
import torch
import yaml

from ascendfactory import tiny
from ascendfactory.ckpt import files as L

VAL_LINE = re.compile(r" validation loss at iteration (\d+) \| lm loss value: (\S+) \| lm loss PPL: (\S+) \|")
VAL_KEYS = {"iteration", "val_loss", "val_ppl", "val_tokens"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model = E.make_model(root)
    return {"root": root, "model": model, "packed": (root / "packed", E.write_sft(root / "packed", model, pack_len=64)),
            "sft": (root / "sft", E.write_sft(root / "sft", model, n=24))}


def val_rows(out: Path) -> dict[int, dict]:
    return {r["iteration"]: r for r in E.metrics(out) if "val_loss" in r}


def _ok(res):
    assert res.returncode == 0, E.describe(res)


# ------------------------------------------------------------------ the split (no torchrun)


def test_held_out_split_is_fixed_by_seed_and_never_trained_on(env):
    from ascendfactory.engine.data import SFTData

    prefix = env["packed"][1]
    data = SFTData(prefix, 64, seed=7, packed=True, val_size=0.25)
    rows = len(data.parts["input_ids"])
    held = set(data.held_out.tolist())
    assert len(held) == round(0.25 * rows) and len(data) == rows - len(held)
    # Two epochs of the training order: every training row, no held-out one.
    order = [data._index(g) for g in range(2 * len(data))]
    assert set(order) == set(range(rows)) - held
    # The same rows for the same seed (any layout, resume or restart builds it the same way), others for another.
    assert np.array_equal(SFTData(prefix, 64, seed=7, packed=True, val_size=0.25).held_out, data.held_out)
    assert not np.array_equal(SFTData(prefix, 64, seed=8, packed=True, val_size=0.25).held_out, data.held_out)
    # A whole number counts samples; without val_size the order is the one every earlier run trained on.
    assert len(SFTData(prefix, 64, seed=7, packed=True, val_size=3).held_out) == 3
    plain = SFTData(prefix, 64, seed=7, packed=True)
    assert [plain._index(g) for g in range(rows)] == np.random.RandomState(7).permutation(rows).tolist()


# ------------------------------------------------------------------ bad input, seen by `plan`


def _plan(tmp_path: Path, env, *args, **exp):
    cfg = {"base": {"device": "cpu", "nproc_per_node": 1, "SEQ_LEN": 64, "MAX_PE": 256, "micro-batch-size": 1,
                    "global-batch-size": 4, "train-iters": 2, "tensor-model-parallel-size": 1, "ckpt_load_type": 0,
                    "pack": True},
           "tiny": {"model_name_or_path": str(env["model"]), "processed_data_dir": str(env["packed"][0]),
                    "output_dir": str(tmp_path / "out"), "exp": exp}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.run([sys.executable, "-m", "ascendfactory", "plan", str(path), "tiny", "exp", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("exp,expected", [
    ({"val_size": 1.5}, "val_size = 1.5: a fraction must be below 1"),
    ({"val_size": 10_000}, "val_size = 10000: holds out 10000 of the"),
    ({"eval_interval": 0}, "eval_interval"),
    ({"eval_dataset": "/nonexistent/val.jsonl"}, "eval_dataset: /nonexistent/val.jsonl does not exist"),
    ({"export_checkpoint": "best"}, "export_checkpoint = best needs a validation set"),
    ({"split": "98,2,0"}, "split = '98,2,0': pretraining only"),
    ({"val_size": 0.1, "eval_processed_data_dir": "/tmp"}, "val_size and eval_processed_data_dir each name"),
])
def test_bad_validation_keys_exit_2_in_plan(env, tmp_path, exp, expected):
    r = _plan(tmp_path, env, **exp)
    assert r.returncode == 2, r.stdout + r.stderr
    assert expected in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("error")]) == 1, r.stderr


def test_plan_shows_the_validation_set_and_when_it_is_evaluated(env, tmp_path):
    from ascendfactory.engine.data import SFTData

    rows = SFTData(env["packed"][1], 64, 1234, True).n
    r = _plan(tmp_path, env, val_size=8, eval_interval=5)
    assert r.returncode == 0, r.stderr
    assert (f"validation  val_size 8 of the training samples, drawn from seed 1234: 8 samples held out, {rows - 8} "
            "left for training, 2 global batch(es) per evaluation; evaluated at iteration 0, every 5 iterations and "
            "at the end") in r.stdout, r.stdout
    j = json.loads(_plan(tmp_path, env, "--json", val_size=8).stdout)["validation"]
    assert (j["samples"], j["train_samples"], j["eval_interval"]) == (8, rows - 8, 1000)


# ------------------------------------------------------------------ torchrun runs


def _run(env, name: str, nproc: int = 1, **kw) -> tuple[Path, str]:
    out = env["root"] / name
    kw.setdefault("pack", True)
    cfg = E.write_config(out, env["model"], kw.pop("data", env["packed"][0]), **kw)
    _ok(res := E.run_engine(cfg, nproc))
    return out, res.stdout


def _hf_validation_loss(model_dir: Path, samples: list[dict]) -> tuple[float, int]:
    """transformers' token-mean cross entropy over the held-out samples, each packed sample cut into its own
    sequences (position ids restart at 0) so that none attends to another."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in samples:
            starts = (s["position_ids"] == 0).nonzero().flatten().tolist() + [len(s["tokens"])]
            for a, b in itertools.pairwise(starts):
                logits = model(input_ids=s["tokens"][a:b][None]).logits[0].float()
                per_token = torch.nn.functional.cross_entropy(logits, s["labels"][a:b], reduction="none")
                total += float((per_token * s["loss_mask"][a:b]).sum())
                count += int(s["loss_mask"][a:b].sum())
    return total / count, count


@pytest.mark.slow
def test_validation_loss_matches_transformers_and_every_layout(env):
    """ckpt_load_type 1 from converted HF weights, packed SFT, val_size 8: the loss at iteration 0 is transformers'
    on the same held-out samples; TP2 (sequence parallel), PP2 (1F1B, forward only) and CP2 give the same
    validation losses; the log line, metrics rows, TensorBoard tag and plot are Megatron's."""
    from ascendfactory.convert.api import hf_to_megatron
    from ascendfactory.engine.data import SFTData

    runs = {}
    for tp, pp, cp in [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2)]:
        conv = env["root"] / f"conv_TP{tp}PP{pp}"
        if not conv.exists():
            hf_to_megatron(str(env["model"]), str(conv), tp, pp, None, None, None)
        runs[(tp, pp, cp)] = _run(env, f"layout_TP{tp}PP{pp}CP{cp}", tp * pp * cp, ckpt_load_type=1,
                                  user_converted_ckpt_path=str(conv), tensor_model_parallel_size=tp,
                                  pipeline_model_parallel_size=pp, context_parallel_size=cp, sequence_parallel=tp > 1,
                                  val_size=8, eval_interval=1, train_iters=2, global_batch_size=4)
    out, stdout = runs[(1, 1, 1)]
    ref = val_rows(out)
    assert sorted(ref) == [0, 1, 2] and all(set(r) == VAL_KEYS for r in ref.values())
    data = SFTData(env["packed"][1], 64, 1234, True, val_size=8)
    hf_loss, hf_tokens = _hf_validation_loss(env["model"], [data.sample(int(i)) for i in data.held_out])
    assert ref[0]["val_loss"] == pytest.approx(hf_loss, rel=1e-4) and ref[0]["val_tokens"] == hf_tokens
    assert ref[0]["val_ppl"] == pytest.approx(math.exp(ref[0]["val_loss"]))
    lines = {int(m[1]): (float(m[2]), float(m[3])) for m in VAL_LINE.finditer(stdout)}
    assert sorted(lines) == [0, 1, 2] and lines[2][0] == pytest.approx(ref[2]["val_loss"], rel=1e-6)
    # Training rows are unchanged: the validation rows sit beside them.
    assert sorted(E.losses(out)) == [1, 2]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(out / "logs" / "tensorboard"))
    tb.Reload()
    assert [e.step for e in tb.Scalars("lm loss validation")] == [0, 1, 2]
    assert (out / "training_loss.png").stat().st_size > 0
    for layout, (other, _) in runs.items():
        got = val_rows(other)
        assert sorted(got) == [0, 1, 2], layout
        for it in got:
            assert got[it]["val_loss"] == pytest.approx(ref[it]["val_loss"], rel=1e-5), (layout, it)
            assert got[it]["val_tokens"] == ref[it]["val_tokens"], (layout, it)


@pytest.mark.slow
def test_training_is_bit_identical_with_evaluation_and_resumes_exactly(env):
    """Dropout on, so that any RNG draw of the evaluation would show: evaluating every iteration on a separate
    dataset (eval_processed_data_dir) trains exactly as no evaluation; resumed from its iteration-2 checkpoint,
    the run repeats iterations 3-4 and their validation losses."""
    common = dict(train_iters=4, save_interval=2, extra_args={"hidden_dropout": 0.2, "attention_dropout": 0.2})
    with_eval, stdout = _run(env, "with_eval", eval_processed_data_dir=str(env["sft"][0]), eval_interval=1, **common)
    without, _ = _run(env, "without_eval", **common)
    assert sorted(val_rows(with_eval)) == [0, 1, 2, 3, 4] and " validation loss at iteration 3 |" in stdout
    assert E.losses(with_eval) == E.losses(without)
    a, b = E.final_weights(with_eval), E.final_weights(without)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    resumed = env["root"] / "resumed"
    shutil.copytree(with_eval / "saved_checkpoints" / "iter_0000002", resumed / "saved_checkpoints" / "iter_0000002")
    L.write_tracker(resumed / "saved_checkpoints", 2)
    again, _ = _run(env, "resumed", eval_processed_data_dir=str(env["sft"][0]), eval_interval=1,
                    train_auto_resume=True, **common)
    first, second = E.losses(with_eval), E.losses(again)
    assert sorted(second) == [3, 4] and all(second[i] == pytest.approx(first[i], rel=1e-6) for i in second)
    v1, v2 = val_rows(with_eval), val_rows(again)
    assert sorted(v2) == [3, 4] and all(v2[i]["val_loss"] == pytest.approx(v1[i]["val_loss"], rel=1e-6) for i in v2)


@pytest.mark.slow
def test_best_checkpoint_exported_with_eval_dataset(tmp_path):
    """Through `train`: eval_dataset (raw) preprocessed into preprocessed_data/validation/, a validation every
    save; a constant high lr makes the loss rise again, so the best is not the last; save_total_limit 1 keeps it,
    best_checkpoint.json and the log name it, and the export converts it."""
    from ascendfactory.convert.target import read_marker

    tiny.make_tiny_model(tmp_path / "model", "qwen2")
    tiny.write_instruction_data(tmp_path / "train.jsonl", n=64)
    tiny.write_instruction_data(tmp_path / "val.jsonl", n=12)
    out = tmp_path / "out"
    cfg = {"base": {"device": "cpu", "nproc_per_node": 1, "SEQ_LEN": 64, "MAX_PE": 256, "micro-batch-size": 2,
                    "global-batch-size": 4, "train-iters": 6, "tensor-model-parallel-size": 1, "prompt_type": "qwen",
                    "ckpt_load_type": 0, "lr": 0.1, "min_lr": 0.1, "lr_decay_style": "constant", "save_interval": 1,
                    "save_total_limit": 1, "export_checkpoint": "best", "use_distributed_optimizer": False},
           "tiny": {"model_name_or_path": str(tmp_path / "model"), "dataset": str(tmp_path / "train.jsonl"),
                    "eval_dataset": str(tmp_path / "val.jsonl"), "handler-name": "AlpacaStyleInstructionHandler",
                    "output_dir": str(out), "exp": {}}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "ascendfactory", "train", str(tmp_path / "cfg.yaml"), "tiny", "exp"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert list((out / "preprocessed_data" / "validation").glob("val_packed_input_ids_document.idx"))
    rows = val_rows(out)
    assert sorted(rows) == list(range(7))
    best_it = min(range(1, 7), key=lambda i: rows[i]["val_loss"])
    best = json.loads((out / "logs" / "best_checkpoint.json").read_text())
    assert best["iteration"] == best_it and best["val_loss"] == rows[best_it]["val_loss"]
    assert f"best checkpoint: iteration {best_it} " in r.stdout
    assert best_it < 6, "the loss did not rise again: the test shows nothing about keeping the best"
    kept = sorted(L.iterations_on_disk(out / "saved_checkpoints"))
    assert kept == [best_it, 6]  # save_total_limit 1: the newest, and the best while it is the best
    assert read_marker(out / "converted_mg2hf_weight")["iteration"] == best_it


@pytest.mark.slow
def test_pretraining_holds_out_megatrons_validation_documents(env):
    """Pretraining: Megatron's `split` and the same val_size fraction hold out the same documents; both train and
    evaluate alike (the trained-on documents exclude the held-out ones: a different split trains differently)."""
    data = env["root"] / "pt"
    E.write_pretrain(data, env["model"])
    runs = {name: _run(env, f"pt_{name}", data=data, stage="pt", pack=False, train_iters=2, eval_interval=2, **kw)[0]
            for name, kw in [("split", {"split": "90,10,0"}), ("val_size", {"val_size": 0.1}),
                             ("none", {})]}
    assert sorted(val_rows(runs["split"])) == [0, 2] and val_rows(runs["split"]) == val_rows(runs["val_size"])
    assert E.losses(runs["split"]) == E.losses(runs["val_size"]) != E.losses(runs["none"])
    assert val_rows(runs["none"]) == {}
