"""Packing, the global sample order, and collation into tensors.

The order is defined over *global* sample positions: position k of the run is row `perm_e[k % n]` of epoch
e = k // n, with `perm_e` a permutation seeded by (seed, e). Optimizer step s reads positions
[s*G, (s+1)*G) with G = micro_batch * world_size * accumulation, and rank r's micro-step m takes the slice
[m*B*W + r*B, m*B*W + (r+1)*B). So the same global batch is seen whatever the number of ranks, and the data
position saved in a checkpoint is a single number of global samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .formats import IGNORE, Example
from .table import ExampleTable


@dataclass
class PackedRow:
    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    # Packed preference pairs: each pair's chosen and rejected lengths, in the row's order (chosen, rejected, next
    # pair's chosen, ...); each side is a sample of its own (positions restart), so no sequence sees another.
    pairs: list[tuple[int, int]] | None = None


def pack(examples: Sequence[Example], max_length: int, strategy: str = "bfd") -> PackedRows:
    """Pack samples into rows of at most max_length tokens.

    bfd (best-fit decreasing, TRL's default): the longest sample first, each into the fullest row it still fits, so
    rows come out fuller (WordNet definitions at 128 tokens: 90% of each row holds tokens, against 79% in order) and
    a step trains on more samples for the same compute. The rows are then in length order, which the seeded shuffle of
    rows (data.shuffle) undoes. greedy: samples in their order, a new row when the next one does not fit.

    Position ids restart at 0 for every sample: attention backends read the restarts as sample boundaries, so no
    token attends across samples. The first token of each sample carries no target, so no sample learns to
    predict its first token from the previous sample's last one.
    """
    lengths = examples.lengths() if isinstance(examples, ExampleTable) else [len(e.input_ids) for e in examples]
    lengths = np.asarray(lengths, np.int64).tolist()
    if strategy == "bfd":
        groups = _best_fit_decreasing(lengths, max_length)
    elif strategy == "greedy":
        groups, used = [], max_length + 1
        for i, n in enumerate(lengths):
            if used + n > max_length:
                groups.append([])
                used = 0
            groups[-1].append(i)
            used += n
    else:
        raise ValueError(f"packing strategy {strategy!r}: use bfd or greedy")
    return PackedRows(examples, groups)


class PackedRows(Sequence):
    """The packed rows, each built when it is read: only the grouping (an index per sample) is held."""

    def __init__(self, examples: Sequence[Example], groups: list[list[int]]):
        self.examples = examples
        self.members = np.asarray([i for g in groups for i in g], np.int64)
        self.starts = np.concatenate([[0], np.cumsum([len(g) for g in groups])]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, r: int) -> PackedRow:
        if isinstance(r, slice):
            return [self[k] for k in range(len(self))[r]]
        if r < 0:
            r += len(self)
        if not 0 <= r < len(self):
            raise IndexError(r)
        samples = [self.examples[int(i)] for i in self.members[self.starts[r]:self.starts[r + 1]]]
        pairs = None
        if samples and samples[0].split:  # a pair packs as two samples, its chosen and its rejected sequence
            pairs = [(e.split, len(e.input_ids) - e.split) for e in samples]
            samples = unpair_sides(samples)
        labels = [e.labels.copy() for e in samples]
        for lab in labels:
            lab[0] = IGNORE
        return PackedRow(np.concatenate([e.input_ids for e in samples]), np.concatenate(labels),
                         np.concatenate([np.arange(len(e.input_ids), dtype=np.int32) for e in samples]), pairs)

    def examples_of(self, r: int) -> np.ndarray:
        """Which examples row `r` holds, in its order."""
        return self.members[self.starts[r]:self.starts[r + 1]]


def _best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins of `capacity`: longest first, each into the bin with the least room that still
    fits it. Bins are looked up by their free room in a segment tree over 0..capacity (which room sizes have an
    open bin), so a sample costs O(log capacity) whatever the number of bins."""
    size = 1
    while size < capacity + 1:
        size *= 2
    count = [0] * (2 * size)  # count[size + r]: open bins with r free; inner nodes: sums
    bins_with_room: list[list[int]] = [[] for _ in range(capacity + 1)]

    def add(room: int, delta: int) -> None:
        i = size + room
        while i:
            count[i] += delta
            i //= 2

    def smallest_room_at_least(n: int) -> int | None:
        if n > capacity:
            return None
        i = size + n
        if count[i]:
            return n
        # Climb until a right sibling holds an open bin, then descend to its leftmost one.
        while i > 1:
            if i % 2 == 0 and count[i + 1]:
                i += 1
                while i < size:
                    i = 2 * i if count[2 * i] else 2 * i + 1
                return i - size
            i //= 2
        return None

    bins: list[list[int]] = []
    for idx in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        n = lengths[idx]
        room = smallest_room_at_least(n)
        if room is None:
            bins.append([idx])
            b, left = len(bins) - 1, capacity - n
        else:
            b = bins_with_room[room].pop()
            add(room, -1)
            bins[b].append(idx)
            left = room - n
        bins_with_room[left].append(b)
        add(left, 1)
    return bins


@dataclass(frozen=True)
class SampleOrder:
    """Which dataset row each global sample position reads: a seeded permutation per epoch (or the rows in order,
    shuffle=False)."""
    num_rows: int
    seed: int
    shuffle: bool = True

    def rows(self, start: int, count: int) -> list[int]:
        out = []
        for k in range(start, start + count):
            epoch, i = divmod(k, self.num_rows)
            out.append(int(self._perm(epoch)[i]))
        return out

    def _perm(self, epoch: int) -> np.ndarray:
        cache = self.__dict__.setdefault("_cache", {})
        if epoch not in cache:
            cache.clear()
            cache[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows) if self.shuffle \
                else np.arange(self.num_rows)
        return cache[epoch]


class MixtureOrder:
    """Which row each global sample position reads when the rows come from several sources mixed by weight.

    Position p draws its source from a seeded categorical over the weights (blocks of BLOCK positions, each from
    its own generator, so any position can be found without drawing all before it twice); the n-th draw of source
    s reads that source's n-th sample in its own epoch order. Rows of source s are numbered from offsets[s].
    A function of the seed and the position only: the same on any number of ranks, and a resume continues it.
    """

    BLOCK = 4096

    def __init__(self, sizes: list[int], weights: list[float], seed: int, shuffle: bool = True):
        self.sizes, self.seed = list(sizes), seed
        p = np.asarray(weights, np.float64)
        self.p = p / p.sum()
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.orders = [SampleOrder(n, seed * 7919 + s, shuffle) for s, n in enumerate(sizes)]
        self._starts = [np.zeros(len(sizes), np.int64)]  # per block: draws of each source before it
        self._block: tuple[int, np.ndarray, np.ndarray] | None = None

    def _draws(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Block b's sources, and each position's index among its source's draws."""
        if self._block is not None and self._block[0] == b:
            return self._block[1], self._block[2]
        while len(self._starts) <= b:  # the counts before each block, computed once, in order
            k = len(self._starts) - 1
            src = np.random.default_rng([self.seed, 104729, k]).choice(len(self.sizes), self.BLOCK, p=self.p)
            self._starts.append(self._starts[k] + np.bincount(src, minlength=len(self.sizes)))
        src = np.random.default_rng([self.seed, 104729, b]).choice(len(self.sizes), self.BLOCK, p=self.p)
        index = np.empty(self.BLOCK, np.int64)
        seen = self._starts[b].copy()
        for i, s in enumerate(src):
            index[i] = seen[s]
            seen[s] += 1
        self._block = (b, src, index)
        return src, index

    def source_of(self, k: int) -> int:
        b, i = divmod(k, self.BLOCK)
        return int(self._draws(b)[0][i])

    def rows(self, start: int, count: int) -> list[int]:
        out = []
        for k in range(start, start + count):
            b, i = divmod(k, self.BLOCK)
            src, index = self._draws(b)
            s = int(src[i])
            out.append(int(self.offsets[s]) + self.orders[s].rows(int(index[i]), 1)[0])
        return out

    def counts(self, n: int) -> list[int]:
        """How many of the first n positions each source supplied (the proportions actually seen)."""
        b, i = divmod(n, self.BLOCK)
        src, _ = self._draws(b)
        return (self._starts[b] + np.bincount(src[:i], minlength=len(self.sizes))).tolist()


@dataclass(frozen=True)
class BatchLayout:
    micro_batch: int
    world_size: int
    accumulation: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.world_size * self.accumulation

    def micro_positions(self, step: int, micro: int, rank: int) -> tuple[int, int]:
        """(first global sample position, count) that `rank` reads in micro-step `micro` of optimizer step `step`."""
        start = step * self.global_batch + micro * self.micro_batch * self.world_size + rank * self.micro_batch
        return start, self.micro_batch


def collate(items: list, pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a micro-batch to its longest member. Packed rows get no attention mask (position ids mark the
    samples) and their padding is one more sample of its own, so it attends to nothing real."""
    if hasattr(items[0], "pixel_values"):  # images (images.ImageExample): pixel values, all one size, and classes
        return {"pixel_values": torch.from_numpy(np.stack([e.pixel_values for e in items])),
                "labels": torch.tensor([e.label for e in items], dtype=torch.long)}
    if isinstance(items[0], Example) and items[0].is_classification:
        T = max(len(e.input_ids) for e in items)
        ids = torch.full((len(items), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), T), dtype=torch.long)
        for i, e in enumerate(items):
            ids[i, : len(e.input_ids)] = torch.from_numpy(e.input_ids.astype(np.int64))
            mask[i, : len(e.input_ids)] = 1
        labels = torch.tensor([int(e.labels[0]) for e in items], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if isinstance(items[0], Example) and items[0].seq2seq:
        return _collate_seq2seq(items, pad_id)
    desirable = None
    if isinstance(items[0], Example) and items[0].split:
        if items[0].desirable >= 0:  # KTO: which rows' completions are desirable (the first half of the rows)
            desirable = torch.tensor([e.desirable == 1 for e in items], dtype=torch.bool)
        items = unpair(items)
    T = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    labels = torch.full((len(items), T), IGNORE, dtype=torch.long)
    packed = isinstance(items[0], PackedRow)
    if packed and items[0].pairs is not None:
        return _collate_packed_pairs(items, ids, labels)
    extra = torch.zeros((len(items), T), dtype=torch.long)
    for i, e in enumerate(items):
        n = len(e.input_ids)
        ids[i, :n] = torch.from_numpy(e.input_ids.astype(np.int64))
        labels[i, :n] = torch.from_numpy(e.labels.astype(np.int64))
        if packed:
            extra[i, :n] = torch.from_numpy(e.position_ids.astype(np.int64))
            extra[i, n:] = torch.arange(T - n)
        else:
            extra[i, :n] = 1
    if packed:
        return {"input_ids": ids, "labels": labels, "position_ids": extra}
    out = {"input_ids": ids, "labels": labels, "attention_mask": extra}
    if desirable is not None:
        out["desirable"] = desirable
    return out


def _collate_seq2seq(items: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """An encoder-decoder's micro-batch: the encoder inputs padded with pad_id and masked, the decoder labels padded
    with IGNORE. The model makes its decoder inputs from the labels (shifted right, its start token first);
    decoder_attention_mask marks the real label positions (and tells count_targets that every one is a target)."""
    S, T = max(len(e.input_ids) for e in items), max(len(e.labels) for e in items)
    ids = torch.full((len(items), S), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), S), dtype=torch.long)
    labels = torch.full((len(items), T), IGNORE, dtype=torch.long)
    decoder_mask = torch.zeros((len(items), T), dtype=torch.long)
    for i, e in enumerate(items):
        ids[i, :len(e.input_ids)] = torch.from_numpy(e.input_ids.astype(np.int64))
        mask[i, :len(e.input_ids)] = 1
        labels[i, :len(e.labels)] = torch.from_numpy(e.labels.astype(np.int64))
        decoder_mask[i, :len(e.labels)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "decoder_attention_mask": decoder_mask}


def _collate_packed_pairs(rows: list[PackedRow], ids: torch.Tensor, labels: torch.Tensor) -> dict:
    """Packed pair rows, with `segments` [B, T]: the sequence each token belongs to in the order of an unpacked
    batch of the same P pairs (chosen sides 0..P-1, rejected sides P..2P-1), -1 on padding, so that per-sequence
    sums come out as from `unpair`."""
    P = sum(len(r.pairs) for r in rows)
    B, T = ids.shape
    positions = torch.arange(T).repeat(B, 1)
    segments = torch.full((B, T), -1, dtype=torch.long)
    p = 0
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.from_numpy(r.input_ids.astype(np.int64))
        labels[i, :n] = torch.from_numpy(r.labels.astype(np.int64))
        positions[i, :n] = torch.from_numpy(r.position_ids.astype(np.int64))
        positions[i, n:] = torch.arange(T - n)  # the padding: one more sample of its own
        at = 0
        for c, rej in r.pairs:
            segments[i, at:at + c], segments[i, at + c:at + c + rej] = p, P + p
            at, p = at + c + rej, p + 1
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "segments": segments}


def unpair_sides(pairs: list) -> list[Example]:
    """Each pair's chosen then rejected sequence, pair after pair (the order of a packed row)."""
    return [side for e in pairs for side in unpair([e])]


def unpair(pairs: list) -> list[Example]:
    """Preference pairs as rows: every chosen sequence, then every rejected one (row i and row i + len(pairs) are
    a pair), so that both go through one forward. A KTO example's rows: its own sequence, then the mismatched one."""
    chosen = [Example(e.input_ids[:e.split], e.labels[:e.split]) for e in pairs]
    rejected = [Example(e.input_ids[e.split:], e.labels[e.split:]) for e in pairs]
    return chosen + rejected


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Tokens (or samples, for classification) that carry a loss in this micro-batch."""
    labels = batch["labels"]
    if labels.dim() == 1:
        return int(labels.numel())
    if "decoder_attention_mask" in batch:  # an encoder-decoder's labels: every one is predicted, the first too
        return int((labels != IGNORE).sum())
    return int((labels[:, 1:] != IGNORE).sum())


def count_inputs(batch: dict[str, torch.Tensor]) -> int:
    """What a micro-batch feeds the model, as throughput counts it: tokens (padding included), or images."""
    if "pixel_values" in batch:
        return int(batch["pixel_values"].shape[0])
    return int(batch["input_ids"].numel())


def useful_size(row) -> int:
    """A row's real content, as throughput counts it: its tokens (never the padding), or 1 for an image."""
    return 1 if hasattr(row, "pixel_values") else len(row.input_ids)
