"""data.streaming: a corpus larger than memory, read as a stream of shards and tokenized on the fly.

Rank r of W reads shards r, r+W, r+2W, ... of the sorted shard list (.jsonl or .parquet files in a folder, or a
glob), record by record, in order; after the last shard it starts again (the next epoch). Packing is greedy over
consecutive samples, as in memory. Nothing is held but the current shard's reader and one row.

The data position is exact and small: the number of records this rank has consumed into the rows it handed out.
A checkpoint stores it per rank; a resume skips that many records (counting lines or parquet rows, without
tokenizing) and continues with the same rows. A stream resumes on the same number of ranks only: another number
would deal the shards out differently.
"""

from __future__ import annotations

import dataclasses
import glob
import json
from pathlib import Path
from typing import Iterator

import numpy as np

from ..distributed import watchdog
from .batching import PackedRow
from .formats import IGNORE, Example, FormatSpec, FormatStats, tokenize_records
from .sources import DataError, Row

SHARD_SUFFIXES = (".jsonl", ".parquet")


def list_shards(spec: str) -> list[Path]:
    p = Path(spec)
    if p.is_dir():
        files = [f for f in p.iterdir() if f.suffix in SHARD_SUFFIXES]
    else:
        files = [Path(f) for f in glob.glob(spec) if Path(f).suffix in SHARD_SUFFIXES]
    return sorted(files)


def stream_problem(spec: str) -> str | None:
    if spec.startswith("builtin:"):
        return f"{spec}: built-in data fits in memory; streaming reads a folder or glob of .jsonl/.parquet shards"
    if not list_shards(spec):
        return (f"{spec}: no .jsonl or .parquet shards found; give a folder of shards or a glob like "
                "data/shard-*.jsonl")
    return None


def _records(path: Path, skip: int = 0) -> Iterator[dict]:
    """The records of one shard from number `skip` on, each a `Row` that names its shard and line."""
    if path.suffix == ".jsonl":
        n = 0
        with open(path, "rb") as fh:  # lines end at b"\n" only, as in the in-memory reader
            for line_no, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                n += 1
                if n <= skip:
                    continue
                try:
                    line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")  # a BOM is not part of the data
                except UnicodeDecodeError as exc:
                    raise DataError(f"{path}:{line_no}: not UTF-8 ({exc.reason} at byte {exc.start}); re-encode "
                                    "the shard as UTF-8") from None
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    raise DataError(f"{path}:{line_no}: not JSON ({exc}); fix or remove the line") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{line_no}: expected a JSON object per line, got {type(obj).__name__}; "
                                    "fix or remove the line")
                yield Row(obj, f"{path}:{line_no}")
    else:
        import pyarrow.parquet as pq

        try:
            f = pq.ParquetFile(path)
            n = 0
            for batch in f.iter_batches(batch_size=1024):
                rows = batch.to_pylist()
                if n + len(rows) <= skip:
                    n += len(rows)
                    continue
                for i, r in enumerate(rows[max(0, skip - n):], max(0, skip - n) + n + 1):
                    yield Row(r, f"{path}: row {i}")
                n += len(rows)
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
            raise DataError(f"{path}: cannot read as parquet ({exc}); rewrite or remove the shard") from None


def _count(path: Path) -> int:
    if path.suffix == ".jsonl":
        with open(path, "rb") as fh:
            return sum(1 for line in fh if line.strip())
    import pyarrow.parquet as pq
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read as parquet ({exc}); rewrite or remove the shard") from None


class StreamingRows:
    """This rank's rows, in order: `take(n)` hands out the next n; `position` is what a checkpoint stores."""

    def __init__(self, spec: str, tok, fmt: FormatSpec, *, rank: int, world_size: int, packing: bool,
                 position: int = 0):
        shards = list_shards(spec)
        if len(shards) < world_size:
            raise DataError(f"{spec}: {len(shards)} shard(s) for {world_size} ranks; each rank reads whole shards, "
                            "so write at least as many shards as ranks")
        self.shards = shards[rank::world_size]
        self.tok, self.fmt, self.packing = tok, fmt, packing
        self.position = position  # records consumed into rows already handed out
        self.stats = FormatStats()
        self._read = position  # records read from the shards so far
        self._pending: tuple[Example, int] | None = None  # a sample read but not yet in a row, and its end position
        self._it = self._samples(position)

    def _samples(self, start: int) -> Iterator[tuple[Example | None, int]]:
        """(example, or None where tokenization dropped the record; records read so far), forever (epochs)."""
        to_skip = start
        while True:
            seen = 0  # records in the shards skipped whole on this pass
            for shard in self.shards:
                skip = 0
                if to_skip:
                    size = _count(shard)
                    if to_skip >= size:
                        to_skip -= size
                        seen += size
                        continue
                    skip, to_skip = to_skip, 0
                for n, record in enumerate(_records(shard, skip)):
                    # The in-memory path's rules exactly (truncation, drops), one record at a time.
                    out, st = tokenize_records(self.tok, [record], self.fmt, f"{shard} (record {skip + n + 1})")
                    for f in dataclasses.fields(FormatStats):
                        setattr(self.stats, f.name, getattr(self.stats, f.name) + getattr(st, f.name))
                    self._read += 1
                    yield (out[0] if out else None), self._read
            if to_skip:  # the position lies in a later epoch
                if seen == 0:
                    raise DataError(f"streaming: the shards {self.shards[0].parent} hold no records")
                to_skip %= seen

    def _next_sample(self) -> tuple[Example, int]:
        while True:
            watchdog.beat()  # each record read is progress, however slow the shard (distributed/watchdog.py)
            ex, pos = next(self._it)
            if ex is not None:
                return ex, pos

    def take(self, n: int) -> list:
        return [self._next_row() for _ in range(n)]

    def _next_row(self):
        if not self.packing:
            ex, pos = self._next_sample()
            self.position = pos
            return ex
        ids, labels, positions = [], [], []
        used = 0
        while True:
            ex, pos = self._pending if self._pending is not None else self._next_sample()
            self._pending = None
            n = len(ex.input_ids)
            if ids and used + n > self.fmt.max_length:
                self._pending = (ex, pos)  # starts the next row; the position stays before it
                break
            lab = ex.labels.copy()
            lab[0] = IGNORE
            ids.append(ex.input_ids), labels.append(lab), positions.append(np.arange(n, dtype=np.int32))
            used += n
            self.position = pos
        return PackedRow(np.concatenate(ids), np.concatenate(labels), np.concatenate(positions))
