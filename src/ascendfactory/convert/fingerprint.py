"""What a conversion was made from and how: compared to skip work already done. Stat calls only.

The marker file is written last (atomically), so its presence with a matching fingerprint
means the folder holds a complete conversion of exactly this source and layout.
"""

from __future__ import annotations

import json
from pathlib import Path

from ascendfactory.ckpt.files import DIST_METADATA, TRACKER, is_torch_dist, iter_dir_name, layout_of, rank_file
from ascendfactory.convert.hfread import INDEX
from ascendfactory.convert.options import ITERATION
from ascendfactory.fsutil import write_text_atomic
from ascendfactory.layout import ShardPlan

MARKER = "ascendfactory_convert.json"


def source_files(model_dir: str | Path) -> dict[str, list[int]]:
    """config.json and the weight files of an HF folder (or the rank files of a Megatron one, the shards and
    indexes of a torch_dist one): [size, mtime_ns]."""
    d = Path(model_dir)
    out = {}
    for p in sorted([*d.glob("*"), *d.glob("*/*")]):  # HF files are top-level, rank files one folder down
        if p.is_file() and (p.name in ("config.json", DIST_METADATA, ".metadata")
                            or p.suffix in (".safetensors", ".pt", ".distcp")
                            or p.name.endswith(".index.json") or p.name == "latest_checkpointed_iteration.txt"):
            st = p.stat()
            out[str(p.relative_to(d))] = [st.st_size, st.st_mtime_ns]
    return out


def fingerprint(source_dir: str | Path, **layout) -> dict:
    return {"source": str(Path(source_dir).resolve()), "files": source_files(source_dir), **layout}


def conversion_fingerprint(hf_dir, layout: ShardPlan, dtype: str | None) -> dict:
    """hf2mg: the HF source and the target layout."""
    ep = {"ep": layout.ep} if layout.ep > 1 else {}  # EP 1 fingerprints as before: earlier conversions stay valid
    return fingerprint(hf_dir, tp=layout.tp, pp=layout.pp, num_layer_list=list(layout.layers), dtype=dtype,
                       padded_vocab_size=layout.padded_vocab_size, **ep)


def reshard_fingerprint(mg_dir, iteration: int, layout: tuple, ckpt_format: str, config_dir, full: bool) -> dict:
    """reshard: one iteration of a Megatron checkpoint, the target layout (TP, PP, EP, layers per stage) and
    format, the model config, and whether the training state was carried (full) or the weights only."""
    tp, pp, ep, layers = layout
    return fingerprint(Path(mg_dir) / iter_dir_name(iteration), iteration=iteration, tp=tp, pp=pp, ep=ep,
                       num_layer_list=list(layers), ckpt_format=ckpt_format, config=str(Path(config_dir).resolve()),
                       full=full)


def export_fingerprint(mg_dir, iteration: int, hf_config_dir, dtype: str | None, shard_size: int) -> dict:
    """mg2hf: one iteration of a Megatron checkpoint, the config it is exported with, and the output options."""
    it_dir = Path(mg_dir) / iter_dir_name(iteration)
    layout = {"format": "torch_dist"} if is_torch_dist(it_dir) else dict(zip(("tp", "pp"), layout_of(it_dir)))
    return fingerprint(it_dir, iteration=iteration, **layout, dtype=dtype, shard_size=shard_size,
                       config=str(Path(hf_config_dir).resolve()))


def conversion_complete(target: Path, layout: ShardPlan) -> bool:
    return (Path(target) / TRACKER).is_file() and all(
        rank_file(target, ITERATION, t, p, layout.pp, e, layout.ep).is_file()
        for p in range(layout.pp) for t in range(layout.tp) for e in range(layout.ep))


def export_complete(target: Path) -> bool:
    try:
        files = set(json.loads((Path(target) / INDEX).read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError):
        return False
    return (Path(target) / "config.json").is_file() and all((Path(target) / f).is_file() for f in files)


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def adapter_fingerprint(mg_dir, iteration: int, hf_config_dir) -> dict:
    """A LoRA checkpoint's adapters in PEFT's format (convert/peft_adapter.py)."""
    return export_fingerprint(mg_dir, iteration, hf_config_dir, None, 0) | {"format": "peft"}


def adapter_complete(target: Path) -> bool:
    return (Path(target) / ADAPTER_CONFIG).is_file() and (Path(target) / ADAPTER_WEIGHTS).is_file()


def read_marker(target_dir: str | Path) -> dict | None:
    path = Path(target_dir) / MARKER
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_marker(target_dir: str | Path, fp: dict) -> None:
    write_text_atomic(Path(target_dir) / MARKER, json.dumps(fp, indent=1, sort_keys=True))
