"""Append-only log of token ids, in RAM with transparent spill to a memory-mapped file.

Guided window attention keeps the whole history as raw ids and re-embeds windows of it on
demand, so the history must be cheap (2 or 4 bytes per token), unbounded (>= 1e9 tokens) and
randomly readable in O(1) per id. The newest `ram_tokens` ids live in a RAM buffer; when it fills,
the buffer is appended to a file and the file is memory-mapped for reads, so the resident memory
of a long session is the RAM buffer plus whatever pages the OS chooses to cache. Positions are
int64 throughout; the on-disk format is the raw little-endian array.

The same class stores any append-only integer array (the n-gram index keeps its chains in it).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype that holds ids below `vocab_size`: uint16 up to 65536, else int32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


class TokenLog:
    """An append-only integer array: `append`, `read`, `gather`, `truncate`, `len`.

    `ram_tokens` bounds the RAM buffer; older entries go to `<spill_dir>/<name>` (a temporary
    directory when None). Reads of any position cost O(1) whether the entry is in RAM or on disk.
    """

    def __init__(
        self,
        dtype: np.dtype | type = np.int32,
        ram_tokens: int = 1 << 22,
        spill_dir: str | os.PathLike | None = None,
        name: str = "tokens.bin",
    ) -> None:
        if ram_tokens < 1:
            raise ValueError(f"ram_tokens must be >= 1, got {ram_tokens}")
        self.dtype = np.dtype(dtype)
        self.ram_tokens = int(ram_tokens)
        self._spill_dir = Path(spill_dir) if spill_dir is not None else None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._name = name
        self._path: Path | None = None
        # Entries [0, n_disk) are in the file, [n_disk, n_disk + n_ram) in the RAM buffer.
        # The buffer starts small and doubles up to ram_tokens: a new stream costs almost
        # nothing (an engine creates one per row whenever its batch is resized).
        self._ram = np.zeros(min(self.ram_tokens, 1024), dtype=self.dtype)
        self._n_ram = 0
        self._n_disk = 0
        self._mm: np.memmap | None = None

    def __len__(self) -> int:
        return self._n_disk + self._n_ram

    @property
    def n_disk(self) -> int:
        """How many entries live in the spill file."""
        return self._n_disk

    @property
    def path(self) -> Path | None:
        """The spill file, once something has been spilled."""
        return self._path

    def nbytes(self) -> int:
        """Host bytes of the entries held (RAM part + file). The RAM buffer grows by doubling,
        so it holds at most twice this (and at least 1024 entries)."""
        return len(self) * self.dtype.itemsize

    def _spill_path(self) -> Path:
        if self._path is None:
            if self._spill_dir is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="duplex-log-")
                folder = Path(self._tmp.name)
            else:
                folder = self._spill_dir
                folder.mkdir(parents=True, exist_ok=True)
            self._path = folder / self._name
            self._path.write_bytes(b"")
        return self._path

    def _remap(self) -> None:
        """Map the file afresh after it grew or shrank (amortised: once per spill)."""
        self._mm = None
        if self._n_disk > 0:
            self._mm = np.memmap(
                self._spill_path(), dtype=self.dtype, mode="r", shape=(self._n_disk,)
            )

    def _spill(self) -> None:
        with open(self._spill_path(), "ab") as f:
            f.write(self._ram[: self._n_ram].tobytes())
        self._n_disk += self._n_ram
        self._n_ram = 0
        self._remap()

    def append(self, ids: np.ndarray | list[int] | int) -> None:
        """Append ids at the end of the log (a scalar, a list or a 1-D array)."""
        arr = np.asarray(ids).reshape(-1)
        if arr.size == 0:
            return
        if arr.dtype.kind in "iu" and arr.size and self.dtype.kind == "u" and arr.min() < 0:
            raise ValueError("negative id in a log of unsigned ids")
        arr = arr.astype(self.dtype, copy=False)
        i = 0
        while i < arr.size:
            room = self.ram_tokens - self._n_ram
            take = min(room, arr.size - i)
            if self._n_ram + take > self._ram.size:
                grown = np.zeros(
                    min(self.ram_tokens, max(2 * self._ram.size, self._n_ram + take)), self.dtype
                )
                grown[: self._n_ram] = self._ram[: self._n_ram]
                self._ram = grown
            self._ram[self._n_ram : self._n_ram + take] = arr[i : i + take]
            self._n_ram += take
            i += take
            if self._n_ram == self.ram_tokens:
                self._spill()

    def read(self, start: int, stop: int) -> np.ndarray:
        """A copy of entries [start, stop) (clamped to the log)."""
        start = max(0, int(start))
        stop = min(len(self), int(stop))
        if stop <= start:
            return np.zeros(0, dtype=self.dtype)
        if start >= self._n_disk:
            # All in the RAM buffer (every streaming step's new ids): a slice, not a gather.
            return self._ram[start - self._n_disk : stop - self._n_disk].copy()
        return self.gather(np.arange(start, stop, dtype=np.int64))

    def gather(self, positions: np.ndarray, fill: int = 0) -> np.ndarray:
        """Entries at `positions` (any shape, int); positions outside [0, len) read `fill`."""
        pos = np.asarray(positions, dtype=np.int64)
        n = len(self)
        if self._n_disk == 0:
            # Nothing spilled (the usual case, and the hot path of every read): one clipped take
            # from the RAM buffer, then `fill` where the position is outside the log.
            inside = (pos >= 0) & (pos < n)
            return np.where(inside, self._ram.take(pos, mode="clip"), self.dtype.type(fill))
        out = np.full(pos.shape, fill, dtype=self.dtype)
        disk = (pos >= 0) & (pos < self._n_disk)
        ram = (pos >= self._n_disk) & (pos < n)
        if disk.any():
            out[disk] = self._mm[pos[disk]]
        if ram.any():
            out[ram] = self._ram[pos[ram] - self._n_disk]
        return out

    def set(self, positions: np.ndarray, values: np.ndarray) -> None:
        """Overwrite existing entries (used by the index when it rehashes; not by the token log)."""
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        vals = np.asarray(values).reshape(-1).astype(self.dtype)
        if pos.size and (pos.min() < 0 or pos.max() >= len(self)):
            raise IndexError("set() outside the log")
        disk = pos < self._n_disk
        if disk.any():
            mm = np.memmap(self._spill_path(), dtype=self.dtype, mode="r+", shape=(self._n_disk,))
            mm[pos[disk]] = vals[disk]
            mm.flush()
            del mm
            self._remap()
        ram = ~disk
        if ram.any():
            self._ram[pos[ram] - self._n_disk] = vals[ram]

    def truncate(self, n: int) -> None:
        """Drop every entry at position >= n (restoring an earlier snapshot of a session)."""
        n = int(n)
        if n < 0 or n > len(self):
            raise ValueError(f"cannot truncate a log of {len(self)} entries to {n}")
        if n >= self._n_disk:
            self._n_ram = n - self._n_disk
            return
        # The cut falls inside the file: shrink the file, the RAM buffer becomes empty.
        self._mm = None
        os.truncate(self._spill_path(), n * self.dtype.itemsize)
        self._n_disk = n
        self._n_ram = 0
        self._remap()

    def close(self) -> None:
        """Release the map and delete a temporary spill directory."""
        self._mm = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
            self._path = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
