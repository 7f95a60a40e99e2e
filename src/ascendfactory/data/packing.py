"""Greedy packing of whole samples into seq_length bins (streaming, a window of samples at a time)."""

from __future__ import annotations

import bisect

import numpy as np

from ascendfactory.data.encode import IGNORE_INDEX

# Samples considered together; a bigger window packs a little tighter but holds more in memory.
PACK_WINDOW = 8192


def pack_window(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: longest sample first, into the fullest bin it still fits.
    Returns bins as lists of sample indices, bins in creation order."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin number), sorted
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        n = lengths[i]
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            space, b = free.pop(j)
            bins[b].append(i)
            if space - n:
                bisect.insort(free, (space - n, b))
        else:
            bins.append([i])
            if capacity - n:
                bisect.insort(free, (capacity - n, len(bins) - 1))
    return bins


def build_bin(samples: list[tuple[np.ndarray, np.ndarray]], capacity: int, pad_id: int):
    """(input_ids, attention_mask, labels) of one bin: samples back to back, sample k marked k in the mask,
    then padding (pad id, mask 0, label -100) up to exactly `capacity`."""
    ids = np.full(capacity, pad_id, dtype=np.int32)
    labels = np.full(capacity, IGNORE_INDEX, dtype=np.int32)
    mask = np.zeros(capacity, dtype=np.int32)
    pos = 0
    for k, (s_ids, s_labels) in enumerate(samples, start=1):
        end = pos + len(s_ids)
        ids[pos:end], labels[pos:end], mask[pos:end] = s_ids, s_labels, k
        pos = end
    return ids, mask, labels
