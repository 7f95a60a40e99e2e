"""torch.save's file format, written one tensor at a time.

torch.save(obj, f) pickles obj into a record `data.pkl`, then writes every tensor's storage as a record of a zip
archive (stored, data 64-byte aligned, CRC-32 in a data descriptor after the data, zip64 fields past 4 GiB). Here
data.pkl is pickled from planned tensors (Planned: shape and dtype only), so it is known before any data, and each
storage record is written when its tensor is produced, in pieces if it comes in parts (a fused tensor's parts in
order): memory holds the tensor being written and the next one, not the file, and fused tensors are never
joined in memory.

The zip container is written here, not by torch's writer (miniz), because that takes a record only whole and
computes its CRC-32 at about a quarter of zlib's speed. The CRC cannot be skipped: it is in the bytes. The bytes
equal those of torch.save(obj, file_object) for the same obj (tests/test_convert_stream.py compares them); the
one part derived from torch itself is the record-name half of `.data/serialization_id`, a C++ std::hash of the
names, taken from torch's own writer on an empty archive with the same names.
"""

from __future__ import annotations

import io
import math
import pickle
import struct
import sys
import zipfile
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

import torch

_ARCHIVE = "archive/"  # the folder torch.save names for a file object (a path would give its basename)
_ALIGN = 64  # torch.serialization._get_storage_alignment()
_U32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
_DESCRIPTOR = 0x08074B50
_PROTOCOL = 2  # torch.serialization.DEFAULT_PROTOCOL


class Planned:
    """A tensor of this shape and dtype (contiguous, on the CPU), pickled as torch.save pickles one."""

    __slots__ = ("shape", "dtype")

    def __init__(self, shape, dtype: torch.dtype):
        self.shape, self.dtype = tuple(int(n) for n in shape), dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def __reduce_ex__(self, proto):
        # Tensor._reduce_ex_internal of a plain CPU tensor; fresh tuples as torch makes them (pickle memoises
        # objects by identity, so sharing one tuple would change the bytes)
        stride = tuple(math.prod(self.shape[i + 1:]) for i in range(len(self.shape)))
        return (torch._utils._rebuild_tensor_v2,
                (_Storage(self), 0, tuple(list(self.shape)), stride, False, OrderedDict()))

    def __repr__(self) -> str:
        return f"Planned({self.shape}, {self.dtype})"


class _Storage:
    __slots__ = ("planned",)

    def __init__(self, planned: Planned):
        self.planned = planned


def _storage_class(dtype: torch.dtype):
    """torch.BFloat16Storage etc.: what torch.save records for a tensor's storage (TypedStorage's pickle type)."""
    if dtype in torch.storage._new_dtypes():  # pickled as an untyped storage plus a dtype: not planned here
        raise ValueError(f"{dtype}: not supported by the streamed writer")
    typed = torch.storage.TypedStorage(wrap_storage=torch.UntypedStorage(0), dtype=dtype, _internal=True)
    return getattr(torch, typed._pickle_storage_type())


def _pickle(obj) -> tuple[bytes, list[Planned]]:
    """data.pkl of obj, and its Planned tensors in storage-key order ("0", "1", ...)."""
    planned: list[Planned] = []

    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            if not isinstance(o, _Storage):
                return None
            p = o.planned
            planned.append(p)
            return ("storage", _storage_class(p.dtype), str(len(planned) - 1), "cpu", math.prod(p.shape))

    buf = io.BytesIO()
    Pickler(buf, protocol=_PROTOCOL).dump(obj)
    return buf.getvalue(), planned


def _hash_combine(seed: int, value: int) -> int:
    """c10::hash_combine on 64-bit size_t."""
    return (seed ^ ((value + 0x9E3779B9 + (seed << 6) + (seed >> 2)) & _MASK64)) & _MASK64


def _torch_closing_records(names: list[str]) -> tuple[list[tuple[str, bytes]], str]:
    """The records torch's writer adds when closing an archive holding `names` (the format version), and the
    record-name hash that starts its serialization id: from torch's own writer on empty records."""
    buf = io.BytesIO()
    w = torch._C.PyTorchFileWriter(buf, True, _ALIGN)
    for n in names:
        w.write_record(n, b"", 0)
    w.write_end_of_file()
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        added = [(i.filename.removeprefix(_ARCHIVE), z.read(i)) for i in z.infolist()[len(names):]]
    *closing, (sid_name, sid) = added
    assert sid_name == ".data/serialization_id", added
    return closing, sid.decode()[:20]


class TorchFileWriter:
    """Writes torch.save(obj)'s bytes to the binary file object `f`, obj holding Planned tensors: write() each
    tensor's data in the order of `planned` (the order torch.save writes them: first seen while pickling);
    leaving the `with` block completes the file.

    The file writes happen on a thread of their own, one record behind: the caller reads (and the CRC of) the
    next tensor while the previous one is written, so a tensor's memory is held until the next write() returns."""

    def __init__(self, f: BinaryIO, obj):
        self.f, self.pos, self.entries, self.names, self.crcs = f, 0, [], [], 0
        self.pool, self.queued = ThreadPoolExecutor(1, thread_name_prefix="torchfile"), []
        data, self.planned = _pickle(obj)
        self.next = 0
        self._record("data.pkl", data)
        self._record(".format_version", b"1")
        self._record(".storage_alignment", str(_ALIGN).encode())
        self._record("byteorder", sys.byteorder.encode())

    def write(self, *parts: torch.Tensor) -> None:
        """The next planned tensor's data: one tensor, or parts whose bytes joined in order make it."""
        if self.next == len(self.planned):
            raise ValueError(f"all {len(self.planned)} planned tensors are written")
        p = self.planned[self.next]
        if any(t.dtype != p.dtype for t in parts) or sum(t.numel() for t in parts) != math.prod(p.shape):
            raise ValueError(f"tensor {self.next}: parts {[(tuple(t.shape), t.dtype) for t in parts]} do not "
                             f"make the planned {p}")
        self._record(f"data/{self.next}", [memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())
                                           for t in parts if t.numel()])
        self.next += 1

    def __enter__(self) -> TorchFileWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        try:
            if exc_type is None:
                self._close()
        finally:
            for q in self.queued:
                q.cancel()
            self.pool.shutdown()  # waits for a write in progress: the caller closes f next

    def _close(self) -> None:
        if self.next != len(self.planned):
            raise ValueError(f"wrote {self.next} of {len(self.planned)} planned tensors")
        closing, names_hash = _torch_closing_records(self.names)
        for name, data in closing:
            self._record(name, data)
        self._record(".data/serialization_id", f"{names_hash}{self.crcs:020d}".encode())
        cd_start = self.pos
        for name, size, crc, ofs in self.entries:
            self._put(_central(name, size, crc, ofs))
        cd_size, eocd64, n = self.pos - cd_start, self.pos, len(self.entries)
        self._put(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 0x002D, 0, 0, n, n, cd_size, cd_start)
                  + struct.pack("<IIQI", 0x07064B50, 0, eocd64, 1)
                  + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, min(n, 0xFFFF), min(n, 0xFFFF), min(cd_size, _U32),
                                min(cd_start, _U32), 0))
        self._wait()
        self.f.flush()

    def _put(self, b) -> None:
        self.queued.append(self.pool.submit(self.f.write, b))
        self.pos += len(b)

    def _wait(self) -> None:
        """Until every queued write is done; a write's error (a full disk's OSError) is raised here."""
        for q in self.queued:
            q.result()
        self.queued = []

    def _record(self, name: str, data) -> None:
        """One stored record, as miniz writes it for torch (its data given whole or in pieces)."""
        pieces = [memoryview(data)] if isinstance(data, bytes) else data
        size, ofs, full = sum(len(b) for b in pieces), self.pos, (_ARCHIVE + name).encode()
        zip64 = size >= _U32 or ofs >= _U32
        fields = (struct.pack("<QQ", size, 0) if size >= _U32 else b"") + (struct.pack("<Q", ofs) if ofs >= _U32
                                                                           else b"")
        extra = struct.pack("<HH", 1, len(fields)) + fields if zip64 else b""
        pad = -(ofs + 30 + len(full) + len(extra) + 4) % _ALIGN  # data aligned by a "FB" extra field of Z's
        extra += b"FB" + struct.pack("<H", pad) + b"Z" * pad
        crc = 0
        for b in pieces:
            crc = zlib.crc32(b, crc)
        head = b""
        for b in pieces:
            head += bytes(b[:8 - len(head)])
        if size >= 8 and struct.unpack_from("<I", head)[0] == _DESCRIPTOR:
            # torch's writer takes any write starting like a data descriptor for one: a record whose data does
            # so adds its bytes 4-8 to the serialization id's CRC part, as miniz writes the data in one call
            self.crcs = _hash_combine(self.crcs, struct.unpack_from("<I", head, 4)[0])
        self._wait()  # the previous record is on disk (its memory free) before this one is queued
        flags = 0x0808 if size else 0x0800  # UTF-8 names; a data descriptor after any data
        self._put(struct.pack("<IHHHHHIIIHH", 0x04034B50, 0, flags, 0, 0, 0, 0, 0, 0, len(full), len(extra))
                  + full + extra)
        for b in pieces:
            self._put(b)
        if size:
            self.crcs = _hash_combine(self.crcs, crc)
            self._put(struct.pack("<IIQQ", _DESCRIPTOR, crc, size, size) if zip64
                      else struct.pack("<IIII", _DESCRIPTOR, crc, size, size))
        self.entries.append((full, size, crc, ofs))
        self.names.append(name)


def _central(name: bytes, size: int, crc: int, ofs: int) -> bytes:
    fields = (struct.pack("<QQ", size, size) if size >= _U32 else b"") + (struct.pack("<Q", ofs) if ofs >= _U32
                                                                          else b"")
    extra = struct.pack("<HH", 1, len(fields)) + fields if fields else b""
    flags = 0x0808 if size else 0x0800
    return struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 0, 0, flags, 0, 0, 0, crc, min(size, _U32), min(size, _U32),
                       len(name), len(extra), 0, 0, 0, 0, min(ofs, _U32)) + name + extra
