"""MoE benchmarks (issue 12): training tokens/s of our engine vs a plain transformers + AdamW loop on the same tiny
Qwen3-MoE, and hf2mg / mg2hf of a Qwen3-MoE model of a few hundred MB (16 experts) vs the naive load-slice-save
baseline (time and peak memory).

    python benchmarks/moe.py [--workdir DIR] [--iters 12] [--threads 2] [--skip-train] [--skip-convert]
    python benchmarks/moe.py --experts-memory [--workdir DIR]   hf2mg's peak memory at 16 vs 64 experts per rank

Conversion at TP2 PP2 EP2; each step in a fresh process (peak RSS = its VmHWM):

  ours hf2mg       ascendfactory.convert.hf_to_megatron (lazy slices, one rank file at a time)
  baseline hf2mg   every safetensors tensor loaded, the same slicing on the in-memory dict, torch.save per rank
  ours mg2hf       ascendfactory.convert.megatron_to_hf (one layer's tensors or one expert at a time)
  baseline mg2hf   torch.load of every rank file, merge in memory, one safetensors save
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import _engine as E  # noqa: E402
from convert import run_step, step  # noqa: E402
from train import engine_run, plain_run  # noqa: E402

# ~240M parameters in bf16 (~460 MiB): 16 experts of 1024 x 512, 6 layers
BIG_MOE = dict(vocab_size=32000, hidden_size=1024, moe_intermediate_size=512, intermediate_size=2048, num_experts=16,
               num_experts_per_tok=4, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4, head_dim=128)
TP, PP, EP = 2, 2, 2
# hf2mg's peak memory against the experts one rank file holds (TP1 PP1 EP1): 1.5 MiB per expert and layer
EXPERTS_MEMORY = dict(BIG_MOE, hidden_size=512, moe_intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2)


def build_model(out: Path, sizes: dict = BIG_MOE) -> None:
    """config.json + random bf16 weights in the hub's per-expert layout (no model in memory)."""
    import torch
    import transformers
    from safetensors.torch import save_file

    from ascendfactory.modelinfo import read_model_facts

    out.mkdir(parents=True)
    cfg = transformers.Qwen3MoeConfig(**sizes, dtype="bfloat16", tie_word_embeddings=False)
    cfg.architectures = ["Qwen3MoeForCausalLM"]
    cfg.save_pretrained(str(out))
    facts = read_model_facts(out)
    gen = torch.Generator().manual_seed(0)
    weights = {}
    for name in _hf_names(facts):
        weights[name] = (torch.randn(_shape(name, facts), generator=gen) * 0.02).to(torch.bfloat16)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})


def _hf_names(facts) -> list[str]:
    from ascendfactory.families import rules_for, stage_items
    from ascendfactory.layout import make_layout

    layout = make_layout(facts, 1, 1)
    return [n for _, _, names in stage_items(rules_for(facts, 1), layout, 0, experts=facts.num_experts,
                                             moe_layers=facts.moe_layers) for n in names]


def _shape(name: str, facts) -> tuple[int, ...]:
    """The HF tensor's shape, from the family table's shape templates (layer / expert numbers as placeholders)."""
    import re

    from ascendfactory.families import hf_shape

    template = re.sub(r"layers\.\d+\.", "layers.{i}.", name)
    template = re.sub(r"experts\.\d+\.", "experts.{e}.", template)
    return hf_shape(template, facts)


def _plan(work: Path):
    from ascendfactory.families import rules_for
    from ascendfactory.layout import make_layout
    from ascendfactory.modelinfo import read_model_facts

    facts = read_model_facts(work / "hf")
    return facts, make_layout(facts, TP, PP, ep=EP), rules_for(facts, PP)


def baseline_hf2mg(work: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from ascendfactory.ckpt.files import checkpoint_args, rank_file
    from ascendfactory.families import model_items

    sd = load_file(work / "hf" / "model.safetensors")
    facts, layout, rules = _plan(work)

    def read(name, rows=None, cols=None):
        t = sd[name]
        return t[rows[0]:rows[1]] if rows else t[:, cols[0]:cols[1]] if cols else t

    read.shape = lambda name: tuple(sd[name].shape)
    args = checkpoint_args(TP, PP, None, str(work / "hf"), facts.architecture, facts.vocab_size,
                           layout.padded_vocab_size, EP, facts.num_experts)
    for p in range(PP):
        for e in range(EP):
            for t in range(TP):
                out = {mg: r.kind.shard(names, read, facts, layout, t).clone()
                       for r, mg, names in model_items(facts, rules, layout, p, e)}
                path = rank_file(work / "mg_base", 1, t, p, PP, e, EP)
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"model": out, "args": args}, path)


def baseline_mg2hf(work: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from ascendfactory.ckpt.files import rank_file
    from ascendfactory.families import merged_items

    facts, layout, rules = _plan(work)
    states = {(t, p, e): torch.load(rank_file(work / "mg_ours", 1, t, p, PP, e, EP), weights_only=False)["model"]
              for p in range(PP) for e in range(EP) for t in range(TP)}
    out = {}
    for p in range(PP):
        for e, r, mg, names in merged_items(facts, [r for r in rules if r.to_hf], layout, p):
            out.update({k: v.contiguous() for k, v in
                        r.kind.merge(names, [states[t, p, e][mg] for t in range(TP)], facts,
                                     facts.vocab_size).items()})
    (work / "hf_base").mkdir()
    save_file(out, str(work / "hf_base" / "model.safetensors"), metadata={"format": "pt"})


def bench_convert(work: Path) -> None:
    if not (work / "hf" / "model.safetensors").is_file():
        build_model(work / "hf")
    for d in ("mg_ours", "mg_base", "hf_ours", "hf_base"):
        shutil.rmtree(work / d, ignore_errors=True)
    res = {name: run_step(name, work, __file__) for name in ("base_hf2mg", "ours_hf2mg", "base_mg2hf", "ours_mg2hf")}
    size = (work / "hf" / "model.safetensors").stat().st_size / 2**20
    print(f"conversion: Qwen3-MoE, {BIG_MOE['num_experts']} experts, {BIG_MOE['num_hidden_layers']} layers, "
          f"{size:.0f} MiB bf16, TP{TP} PP{PP} EP{EP}")
    print(f"{'step':<16}{'seconds':>9}{'peak RSS MiB':>14}{'load':>7}")
    for name, r in res.items():
        print(f"{name:<16}{r['seconds']:>9.1f}{r['peak_rss_mib']:>14.0f}{r['load']:>7.1f}")
    for op in ("hf2mg", "mg2hf"):
        o, b = res[f"ours_{op}"], res[f"base_{op}"]
        print(f"{op}: time ours/baseline = {o['seconds'] / b['seconds']:.2f}, "
              f"peak RSS ours/baseline = {o['peak_rss_mib'] / b['peak_rss_mib']:.2f}")


def bench_experts_memory(work: Path) -> None:
    """hf2mg's peak RSS with 16 and with 64 experts in its one rank file: streamed, it must not grow."""
    print("hf2mg peak memory vs experts per rank file (Qwen3-MoE hidden 512, 4 layers, bf16, TP1 PP1 EP1)")
    for n in (16, 64):
        d = work / f"experts{n}"
        if not (d / "hf" / "model.safetensors").is_file():
            build_model(d / "hf", dict(EXPERTS_MEMORY, num_experts=n))
        shutil.rmtree(d / "mg_ours", ignore_errors=True)
        r = run_step("ours_hf2mg", d, __file__, "--layout", "1,1,1")
        size = sum(p.stat().st_size for p in (d / "mg_ours").rglob("*.pt")) / 2**20
        print(f"{n} experts: rank file {size:.0f} MiB, peak RSS {r['peak_rss_mib']:.0f} MiB, {r['seconds']:.1f} s "
              f"(load {r['load']:.1f})")


def bench_train(iters: int, threads: int) -> None:
    seq, gbs = 256, 8
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = E.make_model(root, "qwen3_moe", hidden_size=256, moe_intermediate_size=256, num_experts=8,
                             num_experts_per_tok=2, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=max(seq, 256))
        prefix = E.write_pretrain(root / "data", model, docs=2000)
        cfg = E.write_config(root / "run", model, root / "data", stage="pt", seq_len=seq, max_pe=max(seq, 256),
                             global_batch_size=gbs, micro_batch_size=gbs, train_iters=iters, save_interval=10**6,
                             lr=1e-4, min_lr=1e-5, lr_warmup_iters=0, device="cpu", precision="fp32")
        ours, launch = engine_run(cfg, threads)
        plain = plain_run(model, prefix, seq, gbs, iters, threads, 1e-4, "cpu")
    print(f"training: tiny Qwen3-MoE (hidden 256, 8 experts top 2, 4 layers, fp32, cpu, seq {seq}, gbs {gbs}, "
          f"{threads} threads)")
    print(f"engine {ours:.0f} tokens/s vs plain transformers+AdamW {plain:.0f} tokens/s: ratio {ours / plain:.2f}; "
          f"launch overhead (command -> first iteration) {launch:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir")
    ap.add_argument("--step")
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-convert", action="store_true")
    ap.add_argument("--layout", default=f"{TP},{PP},{EP}", help="TP,PP,EP of a --step's hf2mg")
    ap.add_argument("--experts-memory", action="store_true",
                    help="only hf2mg's peak memory at 16 vs 64 experts in one rank file (TP1 PP1 EP1)")
    a = ap.parse_args()
    if a.step:
        return step(a.step, Path(a.workdir), tuple(map(int, a.layout.split(","))), (baseline_hf2mg, baseline_mg2hf))
    if not a.skip_train and not a.experts_memory:
        bench_train(a.iters, a.threads)
    if not a.skip_convert:
        work = Path(a.workdir or tempfile.mkdtemp(prefix="af-bench-moe-"))
        try:
            if a.experts_memory:
                bench_experts_memory(work)
            else:
                bench_convert(work)
        finally:
            if not a.workdir:
                shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
