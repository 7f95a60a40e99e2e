"""Engine pieces that need no torchrun: iteration count from epochs, the loss record and plot, the schedule, the
logging and checkpoint policies."""

from __future__ import annotations

import json

import pytest

from ascendfactory import logs
from ascendfactory.config.schema import ExpConfig
from ascendfactory.engine.checkpoint import Checkpointer, RankPlace
from ascendfactory.engine.faults import StopRequest
from ascendfactory.engine.metrics import Metrics, flops_per_token, plot_loss, read_losses
from ascendfactory.engine.trainer import train_iters_of
from ascendfactory.errors import UserError


def _cfg(**kw):
    return ExpConfig(model_name_or_path="m", output_dir="o", **kw)


def test_train_iters_from_epochs_or_config():
    assert train_iters_of(_cfg(train_iters=7), samples_per_epoch=1000) == 7
    assert train_iters_of(_cfg(epochs=2, global_batch_size=64), samples_per_epoch=100) == 4  # ceil(200 / 64)
    assert train_iters_of(_cfg(epochs=0.5, global_batch_size=8), samples_per_epoch=3) == 1
    with pytest.raises(UserError, match="train_iters"):
        train_iters_of(_cfg(train_iters=0), samples_per_epoch=10)


def test_read_losses_last_record_wins_and_survives_a_cut_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    rows = [{"iteration": 1, "loss": 5.0}, {"iteration": 2, "loss": 4.0}, {"iteration": 2, "loss": 4.5}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"iteration": 3, "lo')
    assert read_losses(p) == {1: 5.0, 2: 4.5}


def test_loss_plot(tmp_path):
    pytest.importorskip("matplotlib")
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps({"iteration": i, "loss": 6.0 - i / 10}) + "\n" for i in range(1, 11)))
    png = tmp_path / "training_loss.png"
    assert plot_loss(p, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flops_per_token_counts_weights_and_attention():
    from ascendfactory.modelinfo import ModelFacts

    facts = ModelFacts("Qwen2ForCausalLM", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                       ffn_hidden_size=128, vocab_size=100, max_position_embeddings=256, rms_norm_eps=1e-6,
                       rope_theta=1e4, tie_word_embeddings=False, qkv_bias=True, qk_norm=False)
    weights = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128) + 100 * 64
    assert flops_per_token(facts, seq_len=32) == 6 * weights + 12 * 2 * 32 * 64
    # LoRA: frozen weights need no weight gradients
    assert flops_per_token(facts, seq_len=32, frozen_weights=True) == 4 * weights + 12 * 2 * 32 * 64


def test_metrics_policy_and_rank_0_record(tmp_path, capsys):
    logs.setup()
    m = Metrics(tmp_path, rank=0, log_interval=3, train_iters=7, global_batch_size=4)
    assert [i for i in range(1, 8) if m.should_log(i)] == [3, 6, 7]  # every log_interval, and the last
    assert m.should_log(4, diverged=True)
    row = {"iteration": 3, "consumed_samples": 12, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.5,
           "tokens_per_sec": 100.0, "tflops": 0.01, "iter_ms": 20.0}
    m.log(row)
    m.close()
    assert read_losses(tmp_path / "metrics.jsonl") == {3: 2.5}
    assert "] iteration        3/       7 | consumed samples:           12 |" in capsys.readouterr().out
    other = Metrics(tmp_path / "rank1", rank=1, log_interval=3, train_iters=7, global_batch_size=4)
    other.log(row)  # its line only (the console shows rank 0's): no second record
    other.close()
    assert not (tmp_path / "rank1").exists()


def test_checkpointer_policy_and_unwritable_save_dir(tmp_path):
    place = RankPlace(tp=1, pp=1, dp=1, tp_rank=0, pp_rank=0, dp_rank=0)

    def checkpointer(save_dir):
        return Checkpointer(save_dir, place, interval=4, keep=2, run_id="r", source_model="m",
                            distributed_optimizer=False, stop=StopRequest(), grace_period=60.0)

    c = checkpointer(tmp_path / "saved")
    assert [i for i in range(1, 10) if c.due(i, last=i == 9, stopping=False)] == [4, 8, 9]
    assert c.due(5, last=False, stopping=True)  # a stop request saves at once
    assert list((tmp_path / "saved").iterdir()) == []  # the write probe left nothing
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"file/saved: not writable .*choose another output_dir"):
        checkpointer(tmp_path / "file" / "saved")


_IMPORTS_SCRIPT = """
import json, sys
from ascendfactory.engine import device
device.check_requested("cpu")
device.check_requested("auto")
checked = "torch" in sys.modules
device.setup("cpu")
import megatron.core.jit
print(json.dumps([checked, "megatron.core" in sys.modules, "torch._dynamo" in sys.modules,
                  "torch._inductor.compile_fx" in sys.modules, megatron.core.jit.jit_fuser.__name__]))
"""


def test_device_check_without_torch_and_megatron_core_without_compile_imports():
    """`train` checks the device before launching without importing torch (seconds); the workers' device.setup
    imports megatron-core with its torch.compile decorations deferred, so TorchDynamo / Inductor are not imported."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-W", "ignore", "-c", _IMPORTS_SCRIPT], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    checked, megatron, dynamo, inductor, fuser = json.loads(res.stdout.strip().splitlines()[-1])
    assert (checked, megatron, dynamo, inductor) == (False, True, False, False)
    assert fuser == "compile_on_first_call"
