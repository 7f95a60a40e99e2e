"""megatron-core distributed checkpoints (ckpt_format torch_dist, SPEC.md section 11), read and written without
megatron-core: one process, torch.distributed.checkpoint's FileSystemReader / FileSystemWriter (no_dist).

    iter_N/metadata.json    {"sharded_backend": "torch_dist", ...}: the format, told by content
    iter_N/.metadata        torch's index of the shards (a plain pickle: read here by a restricted unpickler)
    iter_N/__R_0.distcp     raw tensor bytes (read with weights_only) and pickled objects (never read here)
    iter_N/common.pt        args, iteration (read by the safe loader)

The model's tensors sit under megatron-core's sharded keys: global tensors (every TP shard a chunk), the layers of
a homogeneous block stacked on a leading axis (`decoder.layers.self_attention.linear_qkv.weight` [L, ...]) or, for
MoE models (moe_layer_freq as a list), one key per layer (`decoder.layers.3.mlp.router.weight`); local experts
stacked by global index (`...mlp.experts.experts.linear_fc1.weight` [E, ...]); norms under the TE names of the
fused linears (sharded_state_dict_keys_map of megatron-core's local spec). `DistState` shows them as a TP1 PP1 EP1
Megatron state (`decoder.layers.{i}....`, `local_experts.{e}` with e global), one tensor read per access.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch

from ascendfactory.ckpt.files import DCP_INDEX, DIST_METADATA
from ascendfactory.errors import UserError

COMMON_FILE = "common.pt"  # megatron-core's COMMON_STATE_FNAME
# metadata.json as megatron-core writes it for this backend
BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
           "common_backend_version": 1}

# megatron-core's local layer spec saves these norms under the names TE's fused linears give them
_KEYS_MAP = (("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
             ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"))
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.")
_EXPERTS = "mlp.experts.experts."
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_MODEL_KEYS = ("embedding.", "decoder.", "output_layer.")  # the rest: optimizer state, RNG objects
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem")
# torch's writer records its folder (a path: rebuilding one runs no code); pathlib._local from Python 3.13
_PATHS = {(m, n) for m in ("pathlib", "pathlib._local") for n in ("PosixPath", "PurePosixPath")}


class _IndexUnpickler(pickle.Unpickler):
    """Rebuilds only what torch writes into .metadata: its checkpoint record classes, torch.Size, dtypes and
    layouts by name, a path; anything else (a callable that would run code) is refused."""

    def find_class(self, module, name):
        if (module, name) in _PATHS:
            return super().find_class(module, name)
        found = super().find_class(module, name) if module in (*_DCP_MODULES, "torch") else None
        if (module in _DCP_MODULES and isinstance(found, type)) or found is torch.Size \
                or isinstance(found, torch.dtype) or (module, name) == ("torch.serialization", "_get_layout"):
            return found if found is not None else super().find_class(module, name)
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")


def read_index(iter_path: Path):
    """torch's .metadata of a distributed checkpoint, unpickled by the restricted unpickler (in full only with
    trust_checkpoint); UserError naming the file for a refused type or a damaged file."""
    from ascendfactory.ckpt.reader import trusting

    path = Path(iter_path) / DCP_INDEX
    try:
        with open(path, "rb") as f:
            return pickle.load(f) if trusting() else _IndexUnpickler(f).load()
    except pickle.UnpicklingError as e:
        if str(e).startswith("GLOBAL "):
            raise UserError(f"{path}: refused to load type {str(e)[7:]}: unpickling it could run code from the "
                            "file; only if you trust whoever wrote it, set trust_checkpoint: true (convert: "
                            "--trust-checkpoint)") from None
        raise UserError(f"{path}: unreadable checkpoint file ({e})") from None
    except (OSError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise UserError(f"{path}: unreadable checkpoint file ({type(e).__name__}: {e})") from None


def read_common(iter_path: Path) -> dict:
    """common.pt (args, iteration), read by the safe loader."""
    from ascendfactory.ckpt.reader import load_file

    content = load_file(Path(iter_path) / COMMON_FILE)
    if not isinstance(content, dict):
        raise UserError(f"{Path(iter_path) / COMMON_FILE}: holds a {type(content).__name__}, not megatron-core's "
                        "common state; the checkpoint is damaged")
    return content


class _Region:
    """A LoadPlanner's part that read_data calls: copies each read chunk into its place in one tensor."""

    def __init__(self, out: torch.Tensor):
        self.out = out

    def resolve_tensor(self, item) -> torch.Tensor:
        t = self.out
        for dim, (start, length) in enumerate(zip(item.dest_offsets, item.lengths)):
            t = t.narrow(dim, start, length)
        return t

    def commit_tensor(self, item, tensor) -> None:
        pass

    def load_bytes(self, item, value) -> None:  # only tensor keys are ever requested
        raise AssertionError(item)


class DistIndex:
    """The tensors of one torch_dist iteration folder: global sizes, and any region read on its own."""

    def __init__(self, iter_path: Path):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = Path(iter_path)
        self.metadata = read_index(self.path)
        self.tensors = {k: md for k, md in self.metadata.state_dict_metadata.items()
                        if isinstance(md, TensorStorageMetadata)}
        self._reader = FileSystemReader(str(self.path))
        self._reader.set_up_storage_reader(self.metadata, True)

    def size(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def read(self, key: str, prefix: tuple[int, ...] = ()) -> torch.Tensor:
        """key[prefix] (e.g. one layer's, one expert's slice of a stacked key): only the chunks it overlaps are
        read."""
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        size = self.size(key)
        rest = size[len(prefix):]
        out = torch.empty((1,) * len(prefix) + rest, dtype=self.dtype(key))
        chunk = ChunkStorageMetadata(offsets=torch.Size((*prefix, *(0,) * len(rest))), sizes=torch.Size(out.shape))
        items = create_read_items_for_chunk_list(key, self.tensors[key], [chunk])
        # the saved chunks do not overlap (torch checks it when saving): they cover the region or some are missing
        if sum(math.prod(item.lengths) for item in items) != out.numel():
            raise UserError(f"{self.path / DCP_INDEX}: tensor {key} has chunks missing at {list(prefix)}; the "
                            "checkpoint is damaged")
        try:
            self._reader.read_data(LoadPlan(items), _Region(out)).wait()
        except (OSError, RuntimeError, pickle.UnpicklingError, AssertionError) as e:
            raise UserError(f"{self.path}: tensor {key} unreadable ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); the checkpoint is "
                            "damaged") from None
        return out.reshape(rest)


def sharded_key(name: str, stacked: bool) -> tuple[str, tuple[int, ...]]:
    """(megatron-core sharded key, index into its leading axes) of a TP1 PP1 EP1 state name; `stacked`: the
    layers share keys with a leading layer axis."""
    m = _LAYER.match(name)
    if not m:
        return name, ()
    layer, rest = int(m.group(1)), m.group(2)
    for ours, theirs in _KEYS_MAP:
        if rest.startswith(ours):
            rest = theirs + rest[len(ours):]
    index: tuple[int, ...] = ()
    if e := _LOCAL_EXPERT.match(rest):
        rest, index = _EXPERTS + rest[e.end():], (int(e.group(1)),)
    return (f"decoder.layers.{rest}", (layer, *index)) if stacked else (f"decoder.layers.{layer}.{rest}", index)


def state_name(key: str, index: tuple[int, ...], stacked: bool) -> str:
    """Inverse of sharded_key."""
    if not key.startswith("decoder.layers."):
        return key
    rest = key[len("decoder.layers."):]
    if stacked:
        layer, index = index[0], index[1:]
    else:
        layer_s, rest = rest.split(".", 1)
        layer = int(layer_s)
    for ours, theirs in _KEYS_MAP:
        if rest.startswith(theirs):
            rest = ours + rest[len(theirs):]
    if rest.startswith(_EXPERTS):
        rest = f"mlp.experts.local_experts.{index[0]}." + rest[len(_EXPERTS):]
    return f"decoder.layers.{layer}.{rest}"


def _prefix_axes(key: str, stacked: bool) -> int:
    return int(stacked and key.startswith("decoder.layers.")) + int(_EXPERTS in key)


_SWIGLU_PARTS = ("_w", "_v")  # megatron-core's singleton_local_shards: gate and up of linear_fc1 as two keys


class DistState(Mapping):
    """A torch_dist checkpoint's model as a TP1 PP1 EP1 Megatron state: each tensor read from the shards when
    accessed (never kept), so memory stays one global tensor, whatever the model's size."""

    def __init__(self, index: DistIndex):
        self.index = index
        keys = [k for k in index.tensors if k.startswith(_MODEL_KEYS)]
        self.stacked = not any(_LAYER.match(k) for k in keys)
        self._where: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {}
        for k in keys:
            base = k[:-2] if k.endswith(_SWIGLU_PARTS) and k[:-2] + "_w" in index.tensors else k
            parts = tuple(base + p for p in _SWIGLU_PARTS) if base != k else (k,)
            if base != k and k.endswith("_v"):
                continue
            n = _prefix_axes(base, self.stacked)
            for index_ in _indices(index.size(parts[0])[:n]):
                self._where[state_name(base, index_, self.stacked)] = (parts, index_)

    def where(self, name: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """(the sharded keys holding it: one, or gate and up; its index into their leading axes)."""
        return self._where[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        parts, index = self._where[name]
        tensors = [self.index.read(p, index) for p in parts]
        return tensors[0] if len(tensors) == 1 else torch.cat(tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def num_layers(self) -> int:
        return len({m.group(1) for k in self._where if (m := _LAYER.match(k))})


def _indices(sizes: tuple[int, ...]) -> Iterable[tuple[int, ...]]:
    if not sizes:
        yield ()
        return
    for i in range(sizes[0]):
        for rest in _indices(sizes[1:]):
            yield (i, *rest)



def _write_item(key: str, index: tuple[int, ...], shape: torch.Size, global_size: tuple[int, ...], dtype):
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

    offsets = torch.Size((*index, *(0,) * len(shape)))
    return WriteItem(index=MetadataIndex(key, offsets), type=WriteItemType.SHARD, tensor_data=TensorWriteData(
        chunk=ChunkStorageMetadata(offsets=offsets, sizes=torch.Size((1,) * len(index) + tuple(shape))),
        properties=TensorProperties(dtype=dtype), size=torch.Size(global_size)))


def _extra_state(key: str, index: tuple[int, ...], counts: tuple[int, ...]) -> str:
    """The object key under which megatron-core saves a linear module's extra state ([None] without TE), which its
    loader requires: `<module>._extra_state/shard_<offsets>_<sizes>` over the leading axes (0_1 when none)."""
    module = key.rsplit(".", 1)[0]
    offsets, sizes = (index, counts) if index else ((0,), (1,))
    return f"{module}._extra_state/shard_{'.'.join(map(str, offsets))}_{'.'.join(map(str, sizes))}"


def write(iter_path: Path, entries: list[tuple[str, torch.Size, torch.dtype]], fetch: Callable[[str], torch.Tensor],
          stacked: bool, common: dict) -> None:
    """A torch_dist iteration folder holding a TP1 PP1 EP1 state, with the keys and global tensors megatron-core's
    dist_checkpointing.save of a GPTModel writes (it reshards them into any layout on load). entries: (name, shape,
    dtype) of every tensor; fetch(name): the tensor, called once per name while writing (one in memory at a time);
    stacked: the layers share keys (dense models; megatron-core stacks no MoE model's layers)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType

    placed = [(name, *sharded_key(name, stacked), shape, dtype) for name, shape, dtype in entries]
    counts: dict[str, tuple[int, ...]] = {}
    for _, key, index, _, _ in placed:  # a stacked key's leading sizes: the most layers / experts any name has
        counts[key] = tuple(max(c, i + 1) for c, i in zip(counts.get(key, (0,) * len(index)), index))
    items = {(key, index): (name, _write_item(key, index, shape, (*counts[key], *shape), dtype))
             for name, key, index, shape, dtype in placed}
    objects = {_extra_state(key, index, counts[key]): None for _, key, index, _, _ in placed
               if key.rsplit(".", 2)[-2].startswith("linear_")}

    class Planner(DefaultSavePlanner):
        def create_local_plan(self) -> SavePlan:
            self.plan = SavePlan([item for _, item in items.values()]
                                 + [WriteItem(index=MetadataIndex(k), type=WriteItemType.BYTE_IO) for k in objects],
                                 planner_data={})
            return self.plan

        def resolve_data(self, write_item):
            key = write_item.index.fqn
            if write_item.type == WriteItemType.BYTE_IO:
                buf = io.BytesIO()
                torch.save([None], buf)
                return buf
            name, _ = items[(key, tuple(write_item.index.offset[:len(counts[key])]))]
            return fetch(name).reshape(write_item.tensor_data.chunk.sizes)

    iter_path = Path(iter_path)
    iter_path.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # torch's notice that no process group is set up: none is meant to be
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({}, storage_writer=dcp.FileSystemWriter(str(iter_path), thread_count=1), planner=Planner(),
                 no_dist=True)
    with open(iter_path / COMMON_FILE, "wb") as f:  # a Python file: a full disk surfaces as its OSError
        torch.save(common, f)
    write_metadata(iter_path)


def write_metadata(iter_path: Path) -> None:
    """metadata.json: written last, it makes the folder a torch_dist checkpoint (is_torch_dist)."""
    (Path(iter_path) / DIST_METADATA).write_text(json.dumps(BACKEND))
