"""The training samples a rank reads at each global sample position, whatever their origin: one source in memory,
a mixture of sources sampled by weight, or a stream of shards; images augmented by their position. The trainer asks
`rows(position, count)` and never knows which.
"""

from __future__ import annotations

import numpy as np

from .batching import MixtureOrder, SampleOrder, pack
from .dataset import PreparedData
from .images import ImageExample, augment
from .streaming import StreamingRows


class TrainFeed:
    def __init__(self, recipe, data: PreparedData, tok, *, rank: int, world_size: int,
                 stream_position: int | None = None, log=print):
        d = recipe.data
        self.names = data.source_names
        self.stream: StreamingRows | None = None
        self.mixture: MixtureOrder | None = None
        if d.streaming:
            from .dataset import _spec
            self.stream = StreamingRows(d.train, tok, _spec(recipe, d.format, d.columns), rank=rank,
                                        world_size=world_size, packing=d.packing, position=stream_position or 0)
            self.num_rows = None
            log(f"[data] streaming {d.train}: {len(self.stream.shards)} shard(s) on this rank"
                + (f", from record {stream_position:,}" if stream_position else ""))
            return
        parts = data.train_by_source()
        self.packed = None
        # Images are augmented by their global position (images.augment): the same on any number of ranks and
        # after a resume, with no generator state to save.
        a = d.augment
        self.augment = (recipe.seed, a.max_shift, a.flip) if recipe.model.task == "image_classification" and \
            (a.max_shift or a.flip) else None
        if d.packing:
            # A preference pair packs whole (its chosen and rejected sequences side by side, each a sample of its
            # own): rows of twice max_length, as an unpacked pair is two rows of up to max_length.
            pairs = len(data.train) > 0 and data.train[0].split > 0
            capacity = d.max_length * (2 if pairs else 1)
            packed = [pack(p, capacity, d.packing_strategy) for p in parts]
            n_rows = sum(map(len, packed))
            fill = int(data.train.lengths().sum()) / max(1, n_rows * capacity)
            log(f"[data] packed {len(data.train)} {'pairs' if pairs else 'samples'} into {n_rows} rows of <= "
                f"{capacity} ({d.packing_strategy}; {fill:.0%} of each row holds tokens)")
            self.packed, self.example_offsets = packed, np.cumsum([0] + [len(p) for p in parts])
            parts = packed
        self.table = parts[0] if len(parts) == 1 else _Concat(parts)
        self.num_rows = len(self.table)
        if len(parts) > 1:
            self.mixture = MixtureOrder([len(p) for p in parts], data.weights, recipe.seed, d.shuffle)
            total = sum(data.weights)
            log("[data] mixture: " + ", ".join(f"{n} {len(p):,} rows, weight {w / total:.0%}"
                                               for n, p, w in zip(self.names, parts, data.weights)))
            self.order = self.mixture
        else:
            self.order = SampleOrder(self.num_rows, recipe.seed, d.shuffle)

    def rows(self, start: int, count: int) -> list:
        """The rows at global positions start .. start+count (this rank's share of a micro-batch)."""
        return self.take(start, count)[0]

    def take(self, start: int, count: int) -> tuple[list, list[int] | None]:
        """Those rows, and which examples they hold, numbered as in `memory_table` (None for a stream): a packed
        row's examples in its order."""
        if self.stream is not None:
            return self.stream.take(count), None
        indices = self.order.rows(start, count)
        rows = [self.table[i] for i in indices]
        if self.augment is not None:
            seed, max_shift, flip = self.augment
            rows = [ImageExample(augment(r.pixel_values, seed=seed, position=start + k, max_shift=max_shift,
                                         flip=flip), r.label) for k, r in enumerate(rows)]
        if self.packed is None:
            return rows, indices
        row_offsets = np.cumsum([0] + [len(p) for p in self.packed])
        examples = []
        for i in indices:
            s = int(np.searchsorted(row_offsets, i, side="right")) - 1
            examples += (self.packed[s].examples_of(i - int(row_offsets[s])) + int(self.example_offsets[s])).tolist()
        return rows, examples

    @property
    def position(self) -> int | None:
        """A stream's exact place (records consumed by this rank); None in memory (the position says it all)."""
        return self.stream.position if self.stream is not None else None

    def seen(self, samples: int) -> dict[str, float] | None:
        """The share of each source among the first `samples` positions (mixtures only)."""
        if self.mixture is None or samples <= 0:
            return None
        counts = self.mixture.counts(samples)
        return {n: round(c / samples, 4) for n, c in zip(self.names, counts)}


def memory_table(data: PreparedData):
    """The training examples as TrainFeed numbers them without packing: one source's table, or the sources' tables
    one after the other."""
    parts = data.train_by_source()
    return parts[0] if len(parts) == 1 else _Concat(parts)


class _Concat:
    """Several row sequences read as one, without copying them (a mixture's sources, numbered in order)."""

    def __init__(self, parts: list):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int):
        s = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.parts[s][i - int(self.offsets[s])]
