"""Training data: pretrain through megatron-core's GPTDataset, SFT from the packed instruction datasets.

Every sample is addressed by its global index g (0, 1, 2, ... over the whole run), so the order is a
pure function of `seed` and a run resumes at the exact consumed-sample count by starting at g.
A global batch is GBS consecutive indices; DP rank r takes micro-batch slices the Megatron way
(batches of MBS * DP, rank r takes [r * MBS, (r + 1) * MBS)), so any DP size sees the same global batch.

A sample is a dict of [s] tensors: tokens, labels (next-token targets), loss_mask, position_ids and,
when the attention is not plain causal, attention_mask [1, s, s] (True = masked, megatron's convention).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ascendfactory.data.encode import IGNORE_INDEX
from ascendfactory.errors import UserError

SFT_PARTS = ("input_ids", "attention_mask", "labels")


class _EodTokenizer:
    """What GPTDataset needs of a tokenizer: the vocab size and the end-of-document id."""

    def __init__(self, vocab_size: int, eod: int):
        self.vocab_size = vocab_size
        self.eod = eod
        self.unique_identifiers = {"class": type(self).__name__, "vocab_size": vocab_size, "eod": eod}


def eod_id(model_dir: str) -> int:
    from ascendfactory.data.tokenizer import hf_tokenizer

    tok = hf_tokenizer(model_dir)
    eod = tok.eos_token_id if tok.eos_token_id is not None else tok.pad_token_id
    if eod is None:
        raise UserError(f"{model_dir}: tokenizer has neither eos_token nor pad_token; set eos_token")
    return int(eod)


class PretrainData:
    """GPTDataset over `<prefix>_text_document` with exactly `num_samples` samples (shuffled from seed; None: one
    epoch). `split` holds out Megatron's validation documents: `valid` is one epoch of them (None without)."""

    def __init__(self, prefix: str, seq_len: int, num_samples: int | None, seed: int, eod: int, vocab_size: int,
                 reset_position_ids: bool, reset_attention_mask: bool, cache_dir: Path, split: str = "100,0,0"):
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

        config = GPTDatasetConfig(
            random_seed=seed,
            sequence_length=seq_len,
            blend=([prefix], None),
            split=split,
            path_to_cache=str(cache_dir),  # never inside processed_data_dir: that may be the user's
            tokenizer=_EodTokenizer(vocab_size, eod),
            reset_position_ids=reset_position_ids,
            reset_attention_mask=reset_attention_mask,
            eod_mask_loss=False,
            create_attention_mask=reset_attention_mask,  # plain causal needs no mask tensor
            mid_level_dataset_surplus=0.005,
        )
        # Rank 0 builds the index files first (the others then read them); a build killed half-way leaves
        # its marker, and its possibly partial files are thrown away next time.
        first = dist.get_rank() == 0
        building = cache_dir / ".building"
        if first:
            if building.exists():
                shutil.rmtree(cache_dir)
            cache_dir.mkdir(parents=True, exist_ok=True)
            building.touch()
        train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, None, None],
                                                        lambda: True, config).build()
        if first:
            building.unlink()
        self.dataset, self.valid = train, valid

    def __getitem__(self, g: int) -> dict:
        return gpt_sample(self.dataset, g)

    @staticmethod
    def samples_per_epoch(prefix: str, seq_len: int) -> int:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        ds = IndexedDataset(prefix)  # keep it alive: sequence_lengths is a view of its mmap
        tokens = int(ds.sequence_lengths.sum())
        return max(1, (tokens - 1) // seq_len)


def gpt_sample(dataset, g: int) -> dict:
    s = dataset[g]
    return {k: s[k] for k in ("tokens", "labels", "loss_mask", "position_ids", "attention_mask") if k in s}


class SFTData:
    """The packed instruction datasets: one sequence per sample, labels unshifted with -100 for no loss.

    Packed bins (pack=True) are seq_len long; their attention_mask holds k for the k-th sample of the
    bin and 0 for padding, giving per-sample position ids and a block-diagonal causal mask.
    Order: epoch e is a permutation of the training samples drawn from seed + e. val_size holds out samples
    (`held_out`, rows of the dataset) chosen from seed alone, so they never change and are never trained on.
    """

    def __init__(self, prefix: str, seq_len: int, seed: int, packed: bool, val_size: float = 0):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        from ascendfactory.validation import held_out_count

        self.parts = {p: IndexedDataset(f"{prefix}_packed_{p}_document") for p in SFT_PARTS}
        rows = len(self.parts["input_ids"])
        if rows == 0:
            raise UserError(f"processed_data_dir: {prefix}_packed_input_ids_document is empty; check the dataset")
        self.held_out = np.zeros(0, dtype=np.int64)
        self.rows = None  # the training rows; None: all of them (and no lookup)
        if val_size:
            # Its own stream ([seed, 1]): the training order's permutations (seed + e) stay as they were.
            chosen = np.random.RandomState([seed, 1]).permutation(rows)
            k = held_out_count(val_size, rows, "samples of the dataset")
            self.held_out, self.rows = np.sort(chosen[:k]), np.sort(chosen[k:])
        self.n = rows - len(self.held_out)
        self.seq_len, self.seed, self.packed = seq_len, seed, packed
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.n

    def _index(self, g: int) -> int:
        epoch = g // self.n
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.RandomState(self.seed + epoch).permutation(self.n))
        i = int(self._perm[1][g % self.n])
        return i if self.rows is None else int(self.rows[i])

    def __getitem__(self, g: int) -> dict:
        return self.sample(self._index(g))

    def sample(self, i: int) -> dict:
        """Row i of the dataset."""
        ids, seg, lab = (torch.from_numpy(self.parts[p][i][: self.seq_len].astype(np.int64)) for p in SFT_PARTS)
        target = torch.cat([lab[1:], torch.tensor([IGNORE_INDEX])])
        sample = {"tokens": ids}
        if self.packed:
            # No loss across a sample boundary or on padding.
            boundary = torch.cat([seg[1:] != seg[:-1], torch.tensor([True])])
            target[boundary | (seg == 0)] = IGNORE_INDEX
            sample["position_ids"] = _positions_within_segments(seg)
            same = seg[:, None] == seg[None, :]
            sample["attention_mask"] = ~same.tril().unsqueeze(0)  # attend within the sample, causally
        else:
            sample["position_ids"] = torch.arange(len(ids))
        sample["loss_mask"] = (target != IGNORE_INDEX).float()
        sample["labels"] = target.clamp(min=0)
        return sample


class EvalSamples:
    """The validation samples in a fixed order (`get(j)`, j < n), then no-loss copies of the first one that fill
    the last global batch: every layout sees the same samples, whatever its DP size."""

    def __init__(self, get, n: int):
        self.get, self.n = get, n

    def __getitem__(self, j: int) -> dict:
        if j < self.n:
            return self.get(j)
        blank = dict(self.get(0))
        blank["loss_mask"] = torch.zeros_like(blank["loss_mask"])
        return blank


def _positions_within_segments(seg: torch.Tensor) -> torch.Tensor:
    idx = torch.arange(len(seg))
    starts = torch.cat([torch.tensor([True]), seg[1:] != seg[:-1]])
    start_of = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=0).values
    return idx - start_of


def collate(samples: list[dict], pad_to: int) -> dict:
    """Stack samples, right-padding each to `pad_to` tokens (no loss, causal attention keeps them inert)."""
    out = {}
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        out[key] = torch.stack([_pad(s[key], pad_to) for s in samples])
    if "attention_mask" in samples[0]:
        masks = []
        for s in samples:
            m = s["attention_mask"]
            n = m.shape[-1]
            if n == pad_to:  # packed bins and fixed-length pretraining: nothing to pad, no [s, s] copy
                masks.append(m)
                continue
            full = torch.ones(1, pad_to, pad_to, dtype=torch.bool).triu(1)  # padding: causal among itself
            full[:, :n, :n] = m
            full[:, n:, :n] = True
            masks.append(full)
        out["attention_mask"] = torch.stack(masks)
    else:
        out["attention_mask"] = None
    # MoE routing leaves this padding out of the load-balancing loss (its amount depends on the layout)
    out["padding_mask"] = torch.stack([torch.arange(pad_to) >= len(s["tokens"]) for s in samples])
    return out


def _pad(t: torch.Tensor, n: int) -> torch.Tensor:
    if len(t) >= n:
        return t[:n]
    return torch.cat([t, t.new_zeros(n - len(t))])


def pad_length(samples: list[dict], seq_len: int, fixed: bool, multiple: int) -> int:
    """seq_len when shapes must be static (pipeline p2p), else the longest sample rounded up to `multiple`."""
    if fixed:
        return seq_len
    longest = max(len(s["tokens"]) for s in samples)
    return min(seq_len, math.ceil(longest / multiple) * multiple)


class MicroBatches:
    """This DP rank's micro-batches from global sample `consumed` onwards."""

    def __init__(self, data, consumed: int, mbs: int, dp_rank: int, dp_size: int, seq_len: int,
                 fixed_len: bool, multiple: int):
        self.data, self.next_g = data, consumed
        self.mbs, self.dp_rank, self.dp_size = mbs, dp_rank, dp_size
        self.seq_len, self.fixed_len, self.multiple = seq_len, fixed_len, multiple
        self.tokens_read = 0

    def over(self, data) -> MicroBatches:
        """The same slicing and padding over other samples (the validation set), from its first one."""
        return MicroBatches(data, 0, self.mbs, self.dp_rank, self.dp_size, self.seq_len, self.fixed_len, self.multiple)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        start = self.next_g + self.dp_rank * self.mbs
        samples = [self.data[start + k] for k in range(self.mbs)]
        self.next_g += self.mbs * self.dp_size
        batch = collate(samples, pad_length(samples, self.seq_len, self.fixed_len, self.multiple))
        self.tokens_read += batch["tokens"].numel()
        return batch
