"""Tokenized examples stored column-wise: one flat array of token ids, one of labels, and the offsets of each example.

A list of `Example` objects costs ~500 bytes of Python objects per example on top of its tokens, and every rank
holds a whole copy. A table costs 17 bytes per example (offsets and a flag), and `ExampleTable.load` leaves the
tokens in the cache's `.npy` files: each example is read from the file when it is asked for (one `pread`, from the
page cache that the ranks of a node share). Not `mmap`: the kernel maps large page-cache folios whole on a fault, so
a mapped file soon counts megabytes against every rank that reads a few rows of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import os

import numpy as np

from .formats import Example

COLUMNS = ("ids", "labels", "starts", "label_starts", "cls", "split", "desirable", "seq2seq")


class ExampleTable(Sequence):
    def __init__(self, ids: np.ndarray, labels: np.ndarray, starts: np.ndarray, label_starts: np.ndarray,
                 cls: np.ndarray, split: np.ndarray, desirable: np.ndarray, seq2seq: np.ndarray,
                 rows: np.ndarray | None = None):
        self.ids, self.labels, self.starts, self.label_starts, self.cls = ids, labels, starts, label_starts, cls
        self.split = split  # a preference pair's chosen length (Example.split), 0 for everything else
        self.desirable = desirable  # int8: Example.desirable (KTO), -1 for everything else
        self.seq2seq = seq2seq  # bool: an encoder-decoder's example (labels are the decoder's, of their own length)
        self.rows = rows  # a selection (subset, reorder) of the stored examples; None: all, in order

    @classmethod
    def from_examples(cls, examples: list[Example]) -> ExampleTable:
        def flat(arrays):
            return np.concatenate(arrays).astype(np.int32, copy=False) if arrays else np.zeros(0, np.int32)

        def starts(arrays):
            return np.concatenate([[0], np.cumsum([len(a) for a in arrays], dtype=np.int64)]).astype(np.int64)

        ids, labels = [e.input_ids for e in examples], [e.labels for e in examples]
        return cls(flat(ids), flat(labels), starts(ids), starts(labels),
                   np.asarray([e.is_classification for e in examples], np.bool_),
                   np.asarray([e.split for e in examples], np.int32),
                   np.asarray([e.desirable for e in examples], np.int8),
                   np.asarray([e.seq2seq for e in examples], np.bool_))

    @classmethod
    def load(cls, folder: Path, stem: str, *, in_memory: bool = False) -> ExampleTable:
        """The table saved under `stem`; its token columns stay in their files unless `in_memory`."""
        def column(c):
            path = folder / f"{stem}.{c}.npy"
            if c in ("ids", "labels") and not in_memory:
                return FileColumn(path)
            return np.load(path, allow_pickle=False)

        table = cls(*[column(c) for c in COLUMNS])
        n = len(table.cls)
        if len(table.starts) != n + 1 or len(table.label_starts) != n + 1 or table.starts[-1] != len(table.ids) \
                or table.label_starts[-1] != len(table.labels) or len(table.split) != n \
                or len(table.desirable) != n or len(table.seq2seq) != n:
            raise ValueError(f"{folder}: the {stem} columns disagree on their lengths; delete the folder "
                             "(the data is tokenized again on the next run)")
        return table

    def save(self, folder: Path, stem: str) -> None:
        t = self.compact()
        for c in COLUMNS:
            np.save(folder / f"{stem}.{c}.npy", np.ascontiguousarray(getattr(t, c)), allow_pickle=False)

    def compact(self) -> ExampleTable:
        """The selected examples stored contiguously (self when nothing is selected)."""
        if self.rows is None:
            return self
        return ExampleTable.from_examples(list(self))

    def __len__(self) -> int:
        return len(self.cls) if self.rows is None else len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.select(np.arange(len(self))[i])
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = i if self.rows is None else int(self.rows[i])
        a, b = int(self.starts[k]), int(self.starts[k + 1])
        c, d = int(self.label_starts[k]), int(self.label_starts[k + 1])
        return Example(self.ids[a:b], self.labels[c:d], bool(self.cls[k]), int(self.split[k]),
                       int(self.desirable[k]), bool(self.seq2seq[k]))

    def select(self, indices) -> ExampleTable:
        """The examples at `indices` (of this table), sharing its columns."""
        indices = np.asarray(indices, np.int64)
        return ExampleTable(self.ids, self.labels, self.starts, self.label_starts, self.cls, self.split,
                            self.desirable, self.seq2seq, indices if self.rows is None else self.rows[indices])

    def lengths(self) -> np.ndarray:
        """Tokens per example, read from the offsets alone (no token page is touched)."""
        n = np.diff(self.starts)
        return n if self.rows is None else n[self.rows]

    def __repr__(self) -> str:
        return f"ExampleTable({len(self)} examples, {int(self.lengths().sum())} tokens)"


class FileColumn:
    """A 1-D `.npy` array left in its file; a slice is read with one `pread` into a new array."""

    def __init__(self, path: Path):
        with open(path, "rb") as fh:
            fmt = np.lib.format
            version = fmt.read_magic(fh)
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read(fh)
            self.offset = fh.tell()
        if len(shape) != 1 or dtype.hasobject:
            raise ValueError(f"{path}: not a 1-D array of numbers; delete the folder (the data is tokenized again "
                             "on the next run)")
        self.path, self.dtype, self.length = path, dtype, shape[0]
        # Kept open for the run: the cache folder may be replaced meanwhile, and an open file still reads.
        self.fd = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, s: slice) -> np.ndarray:
        a, b, step = s.indices(self.length)
        if step != 1:
            raise IndexError("a file column reads contiguous slices only")
        n = max(0, b - a) * self.dtype.itemsize
        buf = os.pread(self.fd, n, self.offset + a * self.dtype.itemsize)
        if len(buf) != n:
            raise OSError(f"{self.path}: the file ends early; delete its folder (the data is tokenized again)")
        return np.frombuffer(bytearray(buf), self.dtype)  # bytearray: a writable array of its own

    def __array__(self, dtype=None, copy=None):
        out = self[0:self.length]
        return out if dtype is None else out.astype(dtype)

    def __del__(self):
        fd = getattr(self, "fd", None)
        if fd is not None:
            os.close(fd)
