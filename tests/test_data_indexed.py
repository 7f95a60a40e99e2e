"""The streaming writer against megatron-core's own IndexedDatasetBuilder, byte for byte."""

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from ascendfactory.data.indexed import OutputSet, optimal_dtype


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_writer_is_byte_identical_to_indexed_dataset_builder(tmp_path, dtype):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60000, size=int(n)).astype(np.int64) for n in rng.integers(1, 300, size=257)]
    docs.append(np.array([7]))

    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=dtype)
    for d in docs:
        builder.add_document(d, [len(d)])
    builder.finalize(str(tmp_path / "ref.idx"))

    out = OutputSet([str(tmp_path / "sub" / "ours")], dtype)
    for start in range(0, len(docs), 50):  # several chunks, as the pipeline writes them
        part = docs[start:start + 50]
        out.writers[0].add_documents(np.concatenate(part), np.array([len(d) for d in part]))
    written = out.commit()

    assert sorted(p.name for p in written) == ["ours.bin", "ours.idx"]
    for ext in ("bin", "idx"):
        assert (tmp_path / "sub" / f"ours.{ext}").read_bytes() == (tmp_path / f"ref.{ext}").read_bytes()
    ds = IndexedDataset(str(tmp_path / "sub" / "ours"))
    assert len(ds) == len(docs) and (ds[100] == docs[100]).all()
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["ours.bin", "ours.idx"]  # no temp files left


def test_abort_leaves_nothing_and_keeps_existing_outputs(tmp_path):
    (tmp_path / "old.bin").write_bytes(b"old")
    for prefixes in ([tmp_path / "old", tmp_path / "other"], [tmp_path / "new" / "a", tmp_path / "new" / "b"]):
        out = OutputSet([str(p) for p in prefixes], np.int32)
        out.writers[0].add_documents(np.arange(5), np.array([5]))
        out.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.bin"]  # the folder it created is gone too
    assert (tmp_path / "old.bin").read_bytes() == b"old"


def test_optimal_dtype_matches_megatron():
    from megatron.core.datasets.indexed_dataset import DType

    for vocab in (512, 65499, 65500, 151936):
        assert optimal_dtype(vocab) == DType.optimal_dtype(vocab)
