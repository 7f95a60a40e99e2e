"""The device adapter: every device-specific line of the project lives here.

npu  : torch_npu + transfer_to_npu (which maps torch.cuda.* onto the NPU), backend hccl.
cuda : nothing to patch, backend nccl.
cpu  : backend gloo; megatron-core assumes CUDA in a few spots (current_device, the cuda RNG
       state and its tracker, synchronize, the MoE alltoall dispatcher's side stream), which are
       pointed at the CPU here; GroupedMLP gets a reference grouped matmul.

Everything else (trainer, model builder, checkpointing) asks this module for the torch device,
the process-group backend and the RNG state, and never branches on the device itself. What each
device kind offers, torch-free (for `plan`'s rules too), is in ascendfactory/device_facts.py.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ascendfactory.device_facts import BACKENDS, grouped_matmul
from ascendfactory.errors import UserError

if TYPE_CHECKING:
    import torch

# torch is imported where it is used: `train` checks the requested device before launching the workers, and that
# process should not spend seconds importing torch when the device is the CPU (or auto) and no stage needs torch.


@dataclass(frozen=True)
class Device:
    kind: str  # "npu" | "cuda" | "cpu"
    backend: str  # "hccl" | "nccl" | "gloo"

    @property
    def torch_device(self) -> torch.device:
        import torch

        if self.kind == "cpu":
            return torch.device("cpu")
        # transfer_to_npu maps torch.cuda.* onto the NPU, but a torch.device("cuda") we build ourselves would stay
        # a CUDA device: name the NPU as torch_npu registers it.
        if self.kind == "npu":
            return torch.device("npu", torch.npu.current_device())
        return torch.device("cuda", torch.cuda.current_device())

    @property
    def default_precision(self) -> str:
        from ascendfactory.memory import default_precision

        return default_precision(self.kind)

    @property
    def cpu_initialization(self) -> bool:
        """Build weights on the CPU (megatron-core's use_cpu_initialization): only where the CPU is the device;
        on an accelerator it would make every rank initialise full matrices on the host."""
        return self.kind == "cpu"

    @property
    def batched_p2p(self) -> bool:
        """gloo has no coalesced send/recv: pipeline p2p goes one message at a time (same schedule)."""
        return self.backend != "gloo"


_ACTIVE: Device | None = None


def npu_available() -> bool:
    try:
        import torch
        import torch_npu  # noqa: F401
    except Exception:
        return False
    return bool(getattr(torch, "npu", None)) and torch.npu.is_available() and torch.npu.device_count() > 0


def check_requested(requested: str) -> None:
    """A device named in the config (not auto) that this machine lacks is the user's error, found before launch."""
    if requested == "npu" and not npu_available():
        raise UserError("device: npu requested but torch_npu sees no NPU; install torch_npu (the npu extra) on an "
                        "Ascend machine, or set device: auto")
    if requested == "cuda" and not _cuda_available():
        raise UserError("device: cuda requested but torch sees no CUDA GPU; set device: auto (or cpu)")


def detect_kind(requested: str = "auto") -> str:
    """auto: npu if torch_npu sees devices, else cuda, else cpu; an explicit npu / cuda must be there."""
    check_requested(requested)
    if requested != "auto":
        return requested
    if npu_available():
        return "npu"
    if _cuda_available():
        return "cuda"
    return "cpu"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def setup(requested: str = "auto") -> Device:
    """Prepare the process for `requested` (auto|npu|cuda|cpu); idempotent. Call before megatron-core runs."""
    import torch

    global _ACTIVE
    kind = detect_kind(requested)
    if _ACTIVE is not None:
        if _ACTIVE.kind != kind:
            raise RuntimeError(f"device already set up as {_ACTIVE.kind}, cannot switch to {kind}")
        return _ACTIVE
    if kind == "npu":
        import torch_npu  # noqa: F401
        from torch_npu.contrib import transfer_to_npu  # noqa: F401

        os.environ.setdefault("PYTORCH_NPU_ALLOC_CONF", "expandable_segments:True")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dev = Device("npu", BACKENDS["npu"])
    elif kind == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dev = Device("cuda", BACKENDS["cuda"])
    elif kind == "cpu":
        # megatron-core creates dozens of groups, most unused in a given layout: gloo connects each on first use.
        os.environ.setdefault("TORCH_GLOO_LAZY_INIT", "1")
        dev = Device("cpu", BACKENDS["cpu"])
    else:
        raise ValueError(f"unknown device {kind!r}: use auto, npu, cuda or cpu")
    _import_megatron_core()
    if kind == "cpu":
        _patch_megatron_for_cpu()
    _patch_moe_router_without_te()
    _provide_grouped_matmul(kind)
    _ACTIVE = dev
    return dev


def _import_megatron_core() -> None:
    """Import megatron-core with torch.compile deferred to the first call of what it compiles.

    megatron-core decorates its fused functions with torch.compile (megatron.core.jit.jit_fuser) as its modules are
    imported, and torch.compile imports TorchDynamo and Inductor on the spot: ~1.4 s of CPU in every worker before
    the first iteration (~0.9 s net: torch.optim imports TorchDynamo later anyway), for functions a run may never call
    (none on the CPU path). Here a plain function gets a
    wrapper that compiles it on its first call, as torch.compile itself would (it compiles lazily too): the same
    compiled function, the same results. jit_fuser keeps the wrapper for the modules imported later."""
    import functools
    import inspect

    import torch

    real = torch.compile

    def compile_on_first_call(model=None, **options):
        if model is None:  # @torch.compile(mode=...)
            return lambda fn: compile_on_first_call(fn, **options)
        if not inspect.isfunction(model):  # modules and the like: torch's own, unchanged
            return real(model, **options)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = real(model, **options)
            return compiled(*args, **kwargs)

        return call

    torch.compile = compile_on_first_call
    try:
        import megatron.core  # noqa: F401
    finally:
        torch.compile = real


def _patch_moe_router_without_te() -> None:
    """megatron-core 0.16.1's MoE router (moe_utils.router_gating_linear) tests `te_general_gemm is not None`, a
    name bound only when Transformer Engine imports: without TE every MoE forward raises NameError. None is what
    the check expects for "no TE" (it then uses torch's matmul)."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def active() -> Device:
    if _ACTIVE is None:
        raise RuntimeError("device.setup() has not been called")
    return _ACTIVE


def rng_state() -> dict:
    """Every RNG a training step consumes: python, numpy, torch CPU, the accelerator and megatron's tracker."""
    import random

    import numpy as np
    import torch
    from megatron.core import tensor_parallel

    return {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if active().kind != "cpu" else None,
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    import torch
    from megatron.core import tensor_parallel

    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if state.get("cuda_rng_state") is not None and active().kind != "cpu":
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


_CPU_PATCHED = False


def _patch_megatron_for_cpu() -> None:
    """Point megatron-core's CUDA assumptions at the CPU.

    The "cuda" RNG becomes the CPU generator: megatron's tracker forks/restores it around
    tensor-parallel regions exactly as it would the GPU one, so dropout stays deterministic.
    """
    import torch

    global _CPU_PATCHED
    if _CPU_PATCHED:
        return
    _CPU_PATCHED = True

    def is_cuda(dev) -> bool:
        if isinstance(dev, str):
            return dev.startswith("cuda")
        return isinstance(dev, torch.device) and dev.type == "cuda"

    class CudaToCpu(torch.overrides.TorchFunctionMode):
        """Rewrites `device="cuda"` (megatron-core's schedules, masks, buffers) to the CPU, and drops
        `pin_memory=True` (host staging for a copy to the GPU; a CPU-only torch refuses it)."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if is_cuda(kwargs.get("device")):
                kwargs["device"] = "cpu"
            if kwargs.get("pin_memory"):
                kwargs["pin_memory"] = False
            if func is torch.Tensor.to and len(args) > 1 and is_cuda(args[1]):
                args = (args[0], "cpu", *args[2:])
            return func(*args, **kwargs)

    def cpu_get_rng_state(device="cuda"):
        return torch.get_rng_state()

    def cpu_set_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.get_rng_state = cpu_get_rng_state
    torch.cuda.random.get_rng_state = cpu_get_rng_state
    torch.cuda.set_rng_state = cpu_set_rng_state
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = lambda seed: None

    # The alltoall MoE dispatcher copies its split sizes to the host on a side stream and waits on an event: the
    # CPU has one stream, on which everything is already in order.
    class HostStream:
        def wait_stream(self, stream) -> None:
            pass

        def record_event(self, event=None):
            return self

        def synchronize(self) -> None:
            pass

    host_stream = HostStream()
    torch.cuda.Stream = lambda *args, **kwargs: host_stream
    torch.cuda.current_stream = lambda device=None: host_stream
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    # ... and takes the split sizes as numpy arrays from that copy, which skips tensors already on the host.
    from megatron.core.transformer.moe import token_dispatcher

    def host_copy(tensor, as_numpy: bool = False, record_stream: bool = False):
        return tensor.numpy() if as_numpy and torch.is_tensor(tensor) else tensor

    token_dispatcher.maybe_move_tensor_to_cpu = host_copy

    torch.Tensor.cuda = lambda self, device=None, non_blocking=False, **kw: self
    CudaToCpu().__enter__()  # stays active for the life of the process

    # clip_grads and the distributed optimizer assert `t.type() == 'torch.cuda.FloatTensor'` (and the
    # Half/BFloat16 variants): report CPU tensors under the cuda type names; conversions are untouched.
    tensor_type = torch.Tensor.type

    def cuda_named_type(self, dtype=None, non_blocking=False, **kw):
        if dtype is None and not kw:
            name = tensor_type(self)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        return tensor_type(self, dtype, non_blocking, **kw)

    torch.Tensor.type = cuda_named_type

    from megatron.core.tensor_parallel import random as mc_random

    mc_random._set_cuda_rng_state = cpu_set_rng_state
    mc_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()


# ---------------------------------------------------------------- grouped GEMM (MoE experts)


def _reference_gmm(a, b, batch_sizes, trans_b=False):
    """grouped_gemm.ops.gmm's contract in plain torch (autograd included): the rows of `a` in consecutive groups of
    batch_sizes[e] rows, group e times b[e] (b[e].T with trans_b)."""
    import torch

    groups = torch.split(a, batch_sizes.tolist())
    return torch.cat([x @ (w.t() if trans_b else w) for x, w in zip(groups, b, strict=True)])


def _provide_grouped_matmul(kind: str) -> None:
    """megatron-core's GroupedMLP asserts grouped_gemm_util.grouped_gemm and calls grouped_gemm_util.ops.gmm: on
    the CPU both point at the reference above (CUDA with grouped_gemm needs nothing; elsewhere GroupedMLP is
    refused before it is built, engine/moe.py)."""
    if grouped_matmul(kind) != "reference":
        return
    from types import SimpleNamespace

    from megatron.core.transformer.moe import grouped_gemm_util

    ops = SimpleNamespace(gmm=_reference_gmm)
    grouped_gemm_util.grouped_gemm = SimpleNamespace(ops=ops)
    grouped_gemm_util.ops = ops
