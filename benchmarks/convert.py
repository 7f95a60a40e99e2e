"""Conversion benchmark: our streaming hf2mg (TP2 PP2) and mg2hf against a load-everything baseline.

    python benchmarks/convert.py [--workdir DIR] [--keep]

Builds (offline, once) a random-init Qwen2-shaped model of ~0.5B parameters in bf16 safetensors
(Qwen2.5-0.5B sizes), then runs each step in a fresh process and reports wall time and peak RSS:

  ours hf2mg       ascendfactory.convert.hf_to_megatron (lazy slices, one rank at a time)
  baseline hf2mg   transformers from_pretrained, then the same slicing on the loaded state dict, torch.save per rank
  ours mg2hf       ascendfactory.convert.megatron_to_hf (one layer at a time, streamed safetensors)
  baseline mg2hf   torch.load every rank file, merge in memory, safetensors save of the whole model
  floor            `cat` of the step's input files to /dev/null plus a plain write of as many bytes as the
                   step's output files hold (16 MiB writes, no fsync: the conversion does not fsync its data
                   files either), measured in the same run

--repeats N runs every step N times, interleaved, and reports medians (the machine may be shared). `CPU s` is
user + system time of the step's whole process (python start-up and imports included) and its children: less
sensitive than wall time to other jobs on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QWEN2_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                 rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
TP, PP = 2, 2


def build_model(out: Path) -> None:
    """config.json + random bf16 weights written tensor by tensor (no full model in memory)."""
    import torch
    import transformers
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    cfg = transformers.Qwen2Config(**QWEN2_05B, dtype="bfloat16")
    cfg.architectures = ["Qwen2ForCausalLM"]
    cfg.save_pretrained(str(out))
    with torch.device("meta"):
        model = transformers.Qwen2ForCausalLM(cfg)
    shapes = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}
    gen = torch.Generator().manual_seed(0)
    weights = {k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})


def step(name: str, work: Path, layout: tuple[int, int, int] = (TP, PP, 1), baselines=None) -> None:
    """One measured step, run in its own process; prints a json line with its wall and CPU seconds, peak RSS and
    the seconds of its imports (python packages, torch: paid once per conversion, whatever the model's size).
    layout: (TP, PP, EP) of hf2mg; baselines: (hf2mg, mg2hf) baseline functions of work (default: this file's)."""
    tp, pp, ep = layout
    base_hf2mg, base_mg2hf = baselines or (baseline_hf2mg, baseline_mg2hf)
    t0 = time.perf_counter()
    imports = 0.0
    if name.startswith("ours_"):
        from ascendfactory.convert import api

        imports = time.perf_counter() - t0
    if name == "ours_hf2mg":
        api.hf_to_megatron(work / "hf", work / "mg_ours", tp, pp, ep=ep)
    elif name == "base_hf2mg":
        base_hf2mg(work)
    elif name == "ours_mg2hf":
        api.megatron_to_hf(work / "mg_ours", work / "hf_ours", work / "hf")
    elif name == "base_mg2hf":
        base_mg2hf(work)
    elif name.startswith("floor_"):
        floor(*(("hf", "mg_ours") if name == "floor_hf2mg" else ("mg_ours", "hf_ours")), work)
    import resource

    cpu = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    print(json.dumps({"step": name, "seconds": time.perf_counter() - t0, "cpu_seconds": cpu,
                      "peak_rss_mib": peak_rss_mib(), "import_seconds": imports,
                      "load": os.getloadavg()[0]}))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def floor(src: str, dst: str, work: Path) -> None:
    """Read the step's inputs with cat, then write as many bytes as its outputs hold."""
    subprocess.run(["cat", *map(str, _files(work / src))], stdout=subprocess.DEVNULL, check=True)
    left, block = sum(p.stat().st_size for p in _files(work / dst)), bytes(16 * 2**20)
    with open(work / "floor.bin", "wb") as f:
        while left > 0:
            left -= f.write(block[:left])
    os.unlink(work / "floor.bin")


def peak_rss_mib() -> float:
    """VmHWM of this process (ru_maxrss would carry over the parent's peak across exec on Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def baseline_hf2mg(work: Path) -> None:
    import torch
    import transformers

    from ascendfactory.ckpt.files import rank_file
    from ascendfactory.families import rules_for, stage_items
    from ascendfactory.layout import make_layout
    from ascendfactory.modelinfo import read_model_facts

    model = transformers.AutoModelForCausalLM.from_pretrained(str(work / "hf"), dtype=torch.bfloat16)
    sd = model.state_dict()

    def read(name, rows=None, cols=None):
        t = sd[name]
        return t[rows[0]:rows[1]] if rows else t[:, cols[0]:cols[1]] if cols else t

    read.shape = lambda name: tuple(sd[name].shape)
    facts = read_model_facts(work / "hf")
    layout = make_layout(facts, TP, PP)
    rules = rules_for(facts, PP)
    for p in range(PP):
        for t in range(TP):
            out = {mg: r.kind.shard(names, read, facts, layout, t).clone()
                   for r, mg, names in stage_items(rules, layout, p)}
            path = rank_file(work / "mg_base", 1, t, p, PP)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": out}, path)


def baseline_mg2hf(work: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from ascendfactory.ckpt.files import rank_file
    from ascendfactory.families import rules_for, stage_items
    from ascendfactory.layout import make_layout
    from ascendfactory.modelinfo import read_model_facts

    facts = read_model_facts(work / "hf")
    layout = make_layout(facts, TP, PP)
    states = {(t, p): torch.load(rank_file(work / "mg_ours", 1, t, p, PP), weights_only=False)["model"]
              for p in range(PP) for t in range(TP)}
    out = {}
    for p in range(PP):
        for r, mg, names in stage_items([r for r in rules_for(facts, PP) if r.to_hf], layout, p):
            out.update({k: v.contiguous() for k, v in
                        r.kind.merge(names, [states[t, p][mg] for t in range(TP)], facts, facts.vocab_size).items()})
    (work / "hf_base").mkdir()
    save_file(out, str(work / "hf_base" / "model.safetensors"), metadata={"format": "pt"})


def run_step(name: str, work: Path, script: str = __file__, *extra: str) -> dict:
    """`script --step name --workdir work [extra]` in a fresh process: its json line."""
    r = subprocess.run([sys.executable, script, "--step", name, "--workdir", str(work), *extra],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{name} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir")
    ap.add_argument("--step")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--repeats", type=int, default=1)
    a = ap.parse_args()
    if a.step:
        return step(a.step, Path(a.workdir))
    work = Path(a.workdir or tempfile.mkdtemp(prefix="af-bench-convert-"))
    try:
        if not (work / "hf" / "model.safetensors").is_file():
            t = time.perf_counter()
            build_model(work / "hf")
            print(f"built model in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        steps = ("base_hf2mg", "ours_hf2mg", "floor_hf2mg", "base_mg2hf", "ours_mg2hf", "floor_mg2hf")
        runs = {name: [] for name in steps}
        for _ in range(a.repeats):
            for d in ("mg_ours", "mg_base", "hf_ours", "hf_base"):
                shutil.rmtree(work / d, ignore_errors=True)
            for name in steps:
                runs[name].append(run_step(name, work))
        keys = ("seconds", "cpu_seconds", "peak_rss_mib", "import_seconds")
        res = {name: {k: statistics.median(r[k] for r in rs) for k in keys} for name, rs in runs.items()}
        loads = [r["load"] for rs in runs.values() for r in rs]
        params = sum(json.loads((work / "hf_ours" / "model.safetensors.index.json").read_text())["metadata"]
                     .values()) / 2
        largest_rank = max(p.stat().st_size for p in (work / "mg_ours").rglob("*.pt")) / 2**20
        largest_hf = max(p.stat().st_size for p in (work / "hf_ours").glob("*.safetensors")) / 2**20
        print(f"model: Qwen2-shaped, {params / 1e6:.0f}M parameters, bf16, TP{TP} PP{PP}; medians of {a.repeats}; "
              f"1-minute load average {min(loads):.1f}-{max(loads):.1f} at the steps' ends")
        print(f"largest output file: hf2mg {largest_rank:.0f} MiB, mg2hf {largest_hf:.0f} MiB")
        print(f"{'step':<16}{'seconds':>9}{'CPU s':>8}{'imports s':>10}{'peak RSS MiB':>14}   all seconds")
        for name, r in res.items():
            every = " ".join(f"{x['seconds']:.1f}" for x in runs[name])
            print(f"{name:<16}{r['seconds']:>9.1f}{r['cpu_seconds']:>8.1f}{r['import_seconds']:>10.1f}"
                  f"{r['peak_rss_mib']:>14.0f}   {every}")
        for op in ("hf2mg", "mg2hf"):
            o, b, f = res[f"ours_{op}"], res[f"base_{op}"], res[f"floor_{op}"]
            print(f"{op}: time ours/floor = {o['seconds'] / f['seconds']:.2f} (target <= 1.3), "
                  f"ours/baseline = {o['seconds'] / b['seconds']:.2f} (target <= 0.5), "
                  f"peak RSS ours/baseline = {o['peak_rss_mib'] / b['peak_rss_mib']:.2f}; CPU seconds ours/floor = "
                  f"{o['cpu_seconds'] / f['cpu_seconds']:.2f}, "
                  f"ours/baseline = {o['cpu_seconds'] / b['cpu_seconds']:.2f}; "
                  f"time ours without its imports/floor = {(o['seconds'] - o['import_seconds']) / f['seconds']:.2f}")
        print(f"bound (largest output file + 512 MiB): hf2mg {largest_rank + 512:.0f} MiB, "
              f"mg2hf {largest_hf + 512:.0f} MiB")
    finally:
        if not a.keep and not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
