"""plan's memory estimate vs the tensor bytes a training process really holds (CPU, gloo, 2 processes).

    python benchmarks/memory.py [--layouts dp2-distopt-bf16,tp2-sp,pp2,lora-dp2,moe-dp2-distopt-bf16] [--hidden 256]
                                [--layers 4]

Each layout trains one step of a random-init Qwen2-shaped model (the moe- layouts: a Qwen3-MoE one, 8 experts of
MLP size hidden / 2, top-2, its second layer dense) under torchrun; then every rank sums the bytes
of the distinct tensor storages still alive (weights, gradient buffers, optimizer state; the step's activations
are freed by then) and the largest rank is compared with the estimate's weights + gradients + optimizer, computed
by the very function `plan` calls (memory.for_run). CPU torch keeps no allocator statistics, so activations are
estimated but not measured here (on a GPU / NPU: max_memory_allocated).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import _engine as E  # noqa: E402  (tiny model, indexed data and config helpers shared with the tests)

LAYOUTS = {
    "dp2-distopt-bf16": dict(use_distributed_optimizer=True, precision="bf16"),
    "tp2-sp": dict(tensor_model_parallel_size=2, sequence_parallel=True),
    "pp2": dict(pipeline_model_parallel_size=2),
    "lora-dp2": dict(finetuning_type="lora", lora_r=8),
    # EP 1: the trainer on main does not train with EP > 1 yet; plan's EP counts are checked against the converted
    # rank files instead (tests/test_memory.py)
    "moe-dp2-distopt-bf16": dict(use_distributed_optimizer=True, precision="bf16"),
}


def live_tensor_bytes() -> int:
    """Bytes of the distinct storages of every tensor this process still references."""
    import torch

    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not obj.is_meta:
            s = obj.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def worker(config: str, out: str) -> None:
    """Under torchrun: set up the real trainer, train one step, report every rank's live tensor bytes."""
    import torch.distributed as dist

    from ascendfactory.config.loader import load_resolved
    from ascendfactory.engine.trainer import Trainer

    trainer = Trainer(load_resolved(config))
    trainer.setup()
    trainer._train_step()
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, live_tensor_bytes())
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(per_rank))
    dist.destroy_process_group()


def estimate_of(config: Path):
    from ascendfactory import memory
    from ascendfactory.config.loader import load_resolved
    from ascendfactory.launch.cluster import cluster_layout

    cfg = load_resolved(str(config))
    est, _ = memory.for_run(cfg, cluster_layout(cfg, {}, env={}), "")
    return est


def measure(root: Path, model: Path, data: Path, name: str, overrides: dict) -> dict:
    out = root / name
    cfg = E.write_config(out, model, data, pack=True, micro_batch_size=2, global_batch_size=4, seq_len=128,
                         max_pe=256, train_iters=2, lr_warmup_iters=0, nproc_per_node=2, **overrides)
    report = out / "measured.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(E.free_port()), __file__, "--worker", str(cfg), str(report)]
    res = subprocess.run(cmd, env=E.engine_env(), capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"{name}: worker failed\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    measured = max(json.loads(report.read_text()))
    est = estimate_of(cfg)
    static = est.weights + est.gradients + est.optimizer
    return {"layout": name, "parameters": est.parameters, "trainable": est.trainable_parameters,
            "estimate_bytes": static, "measured_bytes": measured, "ratio": round(static / measured, 3),
            "activations_estimate_bytes": est.activations * est.micro_batches_in_flight + est.logits}


def compare(root: Path, layouts: list[str], hidden: int = 256, layers: int = 4) -> list[dict]:
    shape = dict(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                 num_attention_heads=8, num_key_value_heads=2)
    families = {"qwen2": shape, "qwen3_moe": dict(shape, head_dim=hidden // 8, num_experts=8, num_experts_per_tok=2,
                                                  moe_intermediate_size=hidden // 2, mlp_only_layers=[1])}
    models = {}
    rows = []
    for name in layouts:
        family = "qwen3_moe" if name.startswith("moe-") else "qwen2"
        if family not in models:
            model = E.make_model(root, family, **families[family])
            E.write_sft(root / f"sft_{family}", model, n=64, pack_len=128)
            models[family] = model
        rows.append(measure(root, models[family], root / f"sft_{family}", name, LAYOUTS[name]))
    return rows


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], sys.argv[3])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = compare(Path(tmp), a.layouts.split(","), a.hidden, a.layers)
    print("| layout | parameters / rank (trainable) | estimate (weights+grads+optimizer) | measured tensor bytes "
          "| estimate / measured | activations estimate |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layout']} | {r['parameters']:,} ({r['trainable']:,}) | {r['estimate_bytes'] / 2**20:.2f} MiB | "
              f"{r['measured_bytes'] / 2**20:.2f} MiB | {r['ratio']:.3f} | "
              f"{r['activations_estimate_bytes'] / 2**20:.2f} MiB |")


if __name__ == "__main__":
    main()
