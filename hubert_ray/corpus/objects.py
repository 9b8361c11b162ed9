"""The bytes of one audio object, as the decoder reads them (seek/read/tell).

* Local files: the file object fsspec opens (buffered reads; a seek costs nothing).
* Remote objects (S3, GCS, ...): :class:`RangeReader`, one ranged GET per block over an
  fsspec file opened without a cache. Reading on from the end of a block fetches the next one,
  twice as large as the last (up to :data:`READ_BLOCK_BYTES`, so an object read front to back
  costs what fsspec's read-ahead cache cost: one GET per 8 MiB, one in all for an object of at
  most 8 MiB); a read anywhere else (the decoder seeking) fetches :data:`SEEK_READ_BLOCK_BYTES`
  from a little before it, and reading on from there the same again before doubling. A seek
  never re-reads the object from its start: only the blocks the decoder touches are fetched.
  At most two blocks are held, 8 MiB + 256 KiB in all.
* :class:`GuardedFile` wraps either for libsndfile and counts the bytes fetched.

This module must not import torch or ray at import time.
"""

from __future__ import annotations

READ_BLOCK_BYTES = 8 << 20
"""Largest ranged read of a remote object (one GET each), reached when it is read front to
back; local files read as usual."""
SEEK_READ_BLOCK_BYTES = 256 << 10
"""Ranged read of a remote object where the decoder jumps to (a seek): about one S3 request's
latency worth of transfer; reading on from there doubles the block each time."""
SEEK_BACK_BYTES = SEEK_READ_BLOCK_BYTES // 8
"""How far before a jump a block starts (libFLAC's seek probes back a few KiB)."""


class RangeReader:
    """A remote object read in ranged GETs through ``f`` (an fsspec file opened with
    ``cache_type="none"``: each ``read`` is one GET); see the module docstring.

    Two blocks are held: the one read last, and the one the decoder last jumped away from
    (libsndfile reads an Ogg file's last page when it opens it, then goes back to the start; a
    seek may probe behind its target), as long as both hold at most
    ``READ_BLOCK_BYTES + SEEK_READ_BLOCK_BYTES``; reading on drops the block read through.

    ``fetched`` counts the bytes fetched and ``requests`` the GETs. ``first_block`` is the size
    of the first read (the header): :data:`READ_BLOCK_BYTES` for a recording read front to
    back, :data:`SEEK_READ_BLOCK_BYTES` where the decoder will seek."""

    def __init__(self, f, size: int, first_block: int = READ_BLOCK_BYTES):
        self._f = f
        self.size = size
        self._pos = 0
        self._blocks: list[tuple[int, memoryview]] = []  # (start, data); the current one last
        self._next_block = first_block
        self.fetched = 0
        self.requests = 0

    def holds(self, offset: int) -> bool:
        """Whether byte ``offset`` is in a block held (no request to read it)."""
        return any(start <= offset < start + len(data) for start, data in self._blocks)

    def _block_at(self, pos: int) -> tuple[int, memoryview] | None:
        for i, (start, data) in enumerate(self._blocks):
            if start <= pos < start + len(data):
                if i != len(self._blocks) - 1:  # back to the previous block: current again
                    self._blocks.append(self._blocks.pop(i))
                return start, data
        return None

    def _fetch(self, pos: int) -> None:
        """Fetch the block that holds ``pos`` (no block held has it)."""
        current = self._blocks[-1] if self._blocks else None
        if current is None or pos == current[0] + len(current[1]):  # the first read, or on
            start, size = pos, self._next_block
            self._next_block = min(2 * size, READ_BLOCK_BYTES)
            bound = READ_BLOCK_BYTES + SEEK_READ_BLOCK_BYTES  # what two blocks may hold
            self._blocks = [b for b in self._blocks[:-1] if len(b[1]) + size <= bound]
        else:  # a jump: a small block, from a little before; the current one is kept
            start, size = max(0, pos - SEEK_BACK_BYTES), SEEK_READ_BLOCK_BYTES
            self._next_block = SEEK_READ_BLOCK_BYTES
            self._blocks = [current]
        self._f.seek(start)
        data = self._f.read(min(start + size, self.size) - start)
        self.requests += 1
        self.fetched += len(data)
        if len(data):
            self._blocks.append((start, memoryview(data)))

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.size - self._pos
        parts = []
        while n > 0 and self._pos < self.size:
            block = self._block_at(self._pos)
            if block is None:
                self._fetch(self._pos)
                block = self._block_at(self._pos)
                if block is None:  # the object ended early
                    break
            start, data = block
            piece = data[self._pos - start : self._pos - start + n]
            parts.append(piece)
            self._pos += len(piece)
            n -= len(piece)
        return b"".join(parts)

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._pos, self.size)[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._blocks = []
        self._f.close()


class GuardedFile:
    """The file object soundfile reads through. An exception raised inside libsndfile's read
    callback would be lost (the callback returns 0 bytes, which libsndfile takes for the end
    of the file: a silently truncated recording); it is kept in ``error`` instead and raised
    by the stream after the call. ``bytes_read`` counts what the decoder read."""

    def __init__(self, f):
        self._f = f
        self.error: BaseException | None = None
        self.bytes_read = 0

    def read(self, n: int = -1) -> bytes:
        try:
            data = self._f.read(n)
        except Exception as exc:
            self.error = self.error or exc
            return b""
        self.bytes_read += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        try:
            return self._f.seek(offset, whence)
        except Exception as exc:
            self.error = self.error or exc
            return self._f.tell()

    def tell(self) -> int:
        return self._f.tell()


def is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def open_object(fs, path: str):
    """An fsspec file for one object: local files as usual, remote objects with no cache
    (:class:`RangeReader` does the buffering; opening sizes the object with one HEAD)."""
    if is_local(fs):
        return fs.open(path, "rb")
    return fs.open(path, "rb", block_size=READ_BLOCK_BYTES, cache_type="none")
