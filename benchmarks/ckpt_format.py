"""Training checkpoints: ckpt_format torch_dist (megatron-core dist_checkpointing; optionally async_save) vs legacy
(one torch.save file per model-parallel rank), same model, same run: save time, resume-load time, peak memory
of the worker processes during each, size on disk.

    python benchmarks/ckpt_format.py [--repeats 2] [--worlds 1] [--formats legacy,torch_dist,async]
                                     [--hidden 896] [--layers 2] [--optimizer distributed|plain]

Model: a random-init Qwen2-0.5B-shaped model (hidden 896, 14 heads / 2 KV heads, FFN 4864, vocabulary 151,936,
tied embeddings), fp32 on CPU, distributed optimizer on (Adam state: 2 fp32 tensors per parameter). Memory: both
formats save the distributed optimizer's state through megatron-core's
DistributedOptimizer.get_parameter_state_dp_zero, which builds the whole model's parameter and both Adam moments as
three fp32 buffers plus per-bucket shards, receive buffers and a concatenation (one bucket without
overlap_grad_reduce): about 9x the parameter bytes on top of the trainer (measured: +11.3 GB for 315M parameters).
The torch_dist (fully reshardable) form all-gathers it to every DP rank, legacy gathers it to DP rank 0. So the 24
layers (--layers 24: 494M parameters) need ~26 GB at a world-1 save; --layers 12 (315M) peaks at 16.8 GB; the
default, 2 layers (166M parameters: the embedding is 136M of them), fits any machine this project runs on.
--optimizer plain (megatron-core's non-distributed optimizer: each rank saves its Adam state as it holds it, nothing
gathered) takes the full 24-layer model on a 24 GB machine.
World 2 is DP2 (each rank holds half the optimizer state, but the torch_dist save gathers all of it on both).

Each (format, repeat) is two torchrun launches of the real Trainer: the first trains one step (so the Adam state
exists) and saves iteration 1 through its Checkpointer (the engine's own save, timed from the call to the
published checkpoint; async: also the time until save() returns, i.e. training could go on); the second is a
resume (train_auto_resume) of that checkpoint: Trainer.setup builds the model and optimizer, then its _load is
timed. Peak memory: each rank's peak RSS from the start of the phase (VmHWM after resetting it through
/proc/self/clear_refs and returning freed heap with malloc_trim), the rank's RSS before the phase, and the peak
PSS of the rank together with the writer processes megatron-core forks (sampled every 0.2 s).
The checkpoint is read back from the page cache (just written), as a resume on the same node would.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import _engine as E  # noqa: E402  (tiny model, indexed data and config helpers shared with the tests)

FORMATS = {"legacy": dict(ckpt_format="legacy"), "torch_dist": dict(ckpt_format="torch_dist"),
           "async": dict(ckpt_format="torch_dist", async_save=True)}
MiB = 2**20


def _status(pid: int | str, key: str, file: str = "status") -> int:
    """Bytes of a /proc/<pid>/status (VmRSS, VmHWM) or smaps_rollup (Pss) field; 0 when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


@contextlib.contextmanager
def phase(result: dict):
    """Times the block; result gets seconds, rss_before, peak_rss (this process) and tree_peak_pss (this process
    and the writer processes megatron-core forks, sampled: PSS splits the pages they share, RSS would count them
    once per process)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the OS, so the peak is this phase's own
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    result["rss_before"] = _status("self", "VmRSS")
    stop, tree_peak = threading.Event(), [0]

    def sample():
        while not stop.wait(0.2):
            tree = [os.getpid(), *_descendants(os.getpid())]
            tree_peak[0] = max(tree_peak[0], sum(_status(p, "Pss", "smaps_rollup") for p in tree))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result["start"] = time.perf_counter()
    yield result
    result["seconds"] = time.perf_counter() - result["start"]
    stop.set()
    sampler.join()
    result["peak_rss"] = _status("self", "VmHWM")
    result["tree_peak_pss"] = tree_peak[0]


def worker(config: str, what: str, out: str) -> None:
    """Under torchrun. what = save: one training step, then the Checkpointer's save of iteration 1;
    load: Trainer.setup resuming that checkpoint, its _load timed."""
    import torch.distributed as dist

    from ascendfactory.config.loader import load_resolved
    from ascendfactory.engine.trainer import Trainer

    m: dict = {}

    class Timed(Trainer):
        def _load(self):
            if what != "load":
                return super()._load()
            with phase(m):
                super()._load()

    trainer = Timed(load_resolved(config))
    trainer.setup()
    if what == "save":
        trainer._train_step()
        ck = trainer.checkpointer
        with phase(m):
            ck.save(trainer.state)
            # async: save() is back (training would go on) while the shards are still being written
            m["returned"] = time.perf_counter() - m["start"]
            ck.writer.finalize(blocking=True)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, m)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(every))
    dist.destroy_process_group()


def launch(cfg: Path, nproc: int, what: str) -> list[dict]:
    report = cfg.parent / f"{what}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(E.free_port()), __file__, "--worker", str(cfg), what, str(report)]
    res = subprocess.run(cmd, env=E.engine_env(), capture_output=True, text=True, timeout=1200)
    if res.returncode != 0:
        raise RuntimeError(f"{cfg.parent.name} {what}: worker failed\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return json.loads(report.read_text())


def measure(root: Path, model: Path, data: Path, fmt: str, world: int, rep: int, distributed: bool) -> dict:
    out = root / f"{fmt}_w{world}_r{rep}"
    base = dict(stage="pt", seq_len=64, max_pe=256, micro_batch_size=1, global_batch_size=world, train_iters=2,
                save_interval=1, lr=1e-4, min_lr=1e-5, lr_warmup_iters=0, precision="fp32",
                use_distributed_optimizer=distributed, nproc_per_node=world, **FORMATS[fmt])
    E.write_config(out, model, data, ckpt_load_type=0, **base)
    save = launch(out / "exp-config.yaml", world, "save")
    ckpt = out / "saved_checkpoints"
    size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    E.write_config(out, model, data, ckpt_load_type=2, train_auto_resume=True, **base)
    load = launch(out / "exp-config.yaml", world, "load")
    shutil.rmtree(out)
    worst = lambda rows, k: max(r[k] for r in rows)  # noqa: E731  (the slowest / largest rank)
    return {"format": fmt, "world": world, "save_s": worst(save, "seconds"), "save_returned_s": worst(save, "returned"),
            "save_peak_rss": worst(save, "peak_rss"), "save_rss_before": worst(save, "rss_before"),
            "save_tree_peak_pss": worst(save, "tree_peak_pss"), "load_s": worst(load, "seconds"),
            "load_peak_rss": worst(load, "peak_rss"), "load_rss_before": worst(load, "rss_before"),
            "load_tree_peak_pss": worst(load, "tree_peak_pss"),
            "size": size}


def _each(rows: list[dict], fmt: str, world: int, key: str) -> str:
    return ", ".join(f"{r[key]:.1f}" for r in rows if (r["format"], r["world"]) == (fmt, world))


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        worker(*sys.argv[2:5])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--worlds", default="1")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--optimizer", choices=("distributed", "plain"), default="distributed",
                    help="plain: megatron-core's non-distributed optimizer (no gather of its state at a save)")
    a = ap.parse_args()
    formats, worlds = a.formats.split(","), [int(w) for w in a.worlds.split(",")]
    shape = dict(hidden_size=a.hidden, intermediate_size=a.hidden * 38 // 7, num_hidden_layers=a.layers,
                 num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
    rows, loads = [], [loadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # bf16 on disk: only the config and tokenizer are used (ckpt_load_type 0 initialises at random)
        model = E.make_model(root, max_position_embeddings=256, dtype="bfloat16", **shape)
        E.write_pretrain(root / "data", model, docs=200)
        for rep in range(a.repeats):  # formats interleaved, so the machine's load changes hit all of them
            for world in worlds:
                for fmt in formats:
                    rows.append(measure(root, model, root / "data", fmt, world, rep, a.optimizer == "distributed"))
                    loads.append(loadavg())
                    print(json.dumps(rows[-1]), flush=True)
    keys = ("save_s", "save_returned_s", "save_peak_rss", "save_rss_before", "save_tree_peak_pss", "load_s",
            "load_peak_rss", "load_rss_before", "load_tree_peak_pss", "size")
    med = {(f, w): {k: statistics.median(r[k] for r in rows if (r["format"], r["world"]) == (f, w)) for k in keys}
           for w in worlds for f in formats}
    print(f"\n{a.layers} layers, {a.optimizer} optimizer; load average (1 min) during the run: {min(loads):.1f}-"
          f"{max(loads):.1f}; medians of {a.repeats}")
    print("| world | format | save s (each) | save returns s | save peak RSS (before) | save peak PSS with writers "
          "| load s (each) | load peak RSS (before) | load peak PSS | on disk |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (f, w), m in med.items():
        each = functools.partial(_each, rows, f, w)
        print(f"| {w} | {f} | {m['save_s']:.1f} ({each('save_s')}) | {m['save_returned_s']:.1f} | "
              f"{m['save_peak_rss'] / MiB:.0f} MiB ({m['save_rss_before'] / MiB:.0f}) | "
              f"{m['save_tree_peak_pss'] / MiB:.0f} MiB | {m['load_s']:.1f} ({each('load_s')}) | "
              f"{m['load_peak_rss'] / MiB:.0f} MiB ({m['load_rss_before'] / MiB:.0f}) | "
              f"{m['load_tree_peak_pss'] / MiB:.0f} MiB | {m['size'] / MiB:.0f} MiB |")
    for w in worlds:
        if "legacy" not in formats:
            continue
        base = med[("legacy", w)]
        for f in (f for f in formats if f != "legacy"):
            m = med[(f, w)]
            print(f"world {w}: {f} / legacy: save time {m['save_s'] / base['save_s']:.2f} (until save() returns "
                  f"{m['save_returned_s'] / base['save_returned_s']:.2f}), load time {m['load_s'] / base['load_s']:.2f}"
                  f", save peak RSS {m['save_peak_rss'] / base['save_peak_rss']:.2f} (PSS with writers "
                  f"{m['save_tree_peak_pss'] / base['save_tree_peak_pss']:.2f}), load peak RSS "
                  f"{m['load_peak_rss'] / base['load_peak_rss']:.2f}, size {m['size'] / base['size']:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
