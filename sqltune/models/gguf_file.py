"""Whether a file is a whole GGUF, checked before any reader touches it.

    check("model.gguf")   # returns quietly, or raises ModelError: not a GGUF / truncated at byte N / corrupt

gguf's GGUFReader and transformers trust the header: a truncated file fails in numpy's reshape, a
file cut inside the header with an IndexError, an empty one in mmap, and a tensor count flipped to
2^63 allocates or loops on it. This walks the header as the spec lays it out
(https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) with every length checked against the
file's size, then checks that each tensor's bytes lie inside the file, so a copy cut short is named
with the byte it ends at. Reading the header costs milliseconds (the tokenizer's strings are the
bulk of it); the tensor data is never read.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

from sqltune.errors import ModelError

MAGIC = b"GGUF"
# value type -> size in bytes (GGUFValueType: uint8 .. float64; 8 = string and 9 = array are variable)
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9
MAX_DIMS = 8  # ggml's GGML_MAX_DIMS is 4; a larger count is a corrupt header
# counts no real file reaches (a vocabulary is ~10^5 strings, a model ~10^3 tensors): past them and past
# the file's end, a count is garbage rather than the start of a part that was cut off
MAX_ITEMS, MAX_STRING = 1 << 24, 1 << 26
FIX = ("the file is damaged or was cut short: download or export it again (`sqltune export gguf` writes a complete "
       "file) and compare its size and sha256 with the original")


class _Truncated(Exception):
    def __init__(self, what: str, end: int) -> None:
        super().__init__(what)
        self.what, self.end = what, end


class _Corrupt(Exception):
    pass


class _Header:
    """A bounded reader of the header: every read is checked against the file's size first."""

    def __init__(self, fh: BinaryIO, size: int) -> None:
        self.fh, self.size, self.pos = fh, size, 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > self.size:
            raise _Truncated(what, self.pos + n)
        data = self.fh.read(n)
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise _Truncated(what, self.pos + n)
        self.fh.seek(n, 1)
        self.pos += n

    def u32(self, what: str) -> int:
        return int(struct.unpack("<I", self.take(4, what))[0])

    def u64(self, what: str) -> int:
        return int(struct.unpack("<Q", self.take(8, what))[0])

    def count(self, what: str, wide: bool, least_bytes: int, limit: int) -> int:
        """A count of items of at least `least_bytes` each. Past what the file holds it is a cut file, unless
        it is also past `limit`, which no real model reaches: then the header itself is garbage."""
        at = self.pos
        n = self.u64(what) if wide else self.u32(what)
        if n * least_bytes > self.size - self.pos and n > limit:
            raise _Corrupt(f"{what} at byte {at} is {n}, more than the {self.size}-byte file can hold")
        return n

    def string(self, what: str, wide: bool) -> str:
        n = self.count(f"the length of {what}", wide, 1, MAX_STRING)
        return self.take(n, what).decode("utf-8", "replace")

    def value(self, kind: int, what: str, wide: bool) -> object:
        if kind in _SCALAR:
            raw = self.take(_SCALAR[kind], what)
            if kind in (4, 10):
                return int.from_bytes(raw, "little")
            return None
        if kind == STRING:
            return self.string(what, wide)
        if kind == ARRAY:
            item = self.u32(f"the item type of {what}")
            if item not in _SCALAR and item not in (STRING, ARRAY):
                raise _Corrupt(f"{what} has an unknown item type {item}")
            n = self.count(f"the item count of {what}", wide, _SCALAR.get(item, 4 if item == ARRAY else 8), MAX_ITEMS)
            if item in _SCALAR:
                self.skip(n * _SCALAR[item], what)
            else:
                for i in range(n):
                    self.value(item, f"{what}[{i}]", wide)
            return None
        raise _Corrupt(f"{what} has an unknown value type {kind}")


def check(path: str | Path) -> None:
    """Raise ModelError naming `path`, the cause and the fix unless it is a complete GGUF file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(4)
            if size == 0:
                raise ModelError(f"{path} is empty (0 bytes), not a GGUF file", FIX)
            if head != MAGIC:
                raise ModelError(f"{path} is not a GGUF file: it starts with {head!r}, a GGUF with b'GGUF'",
                                 "pass a .gguf written by `sqltune export gguf` or llama.cpp's converter" if size > 4
                                 else FIX)
            fh.seek(0)
            _walk(_Header(fh, size), path)
    except _Truncated as e:
        raise ModelError(f"{path} is truncated at byte {size}: {e.what} needs bytes up to {e.end}", FIX) from None
    except _Corrupt as e:
        raise ModelError(f"{path} is not a readable GGUF (corrupt header): {e}", FIX) from None
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror or e}", "check the path and its permissions") from None


def _walk(h: _Header, path: Path) -> None:
    from gguf.constants import GGML_QUANT_SIZES

    h.take(4, "the magic")
    version = h.u32("the version")
    if version not in (1, 2, 3):
        raise _Corrupt(f"version {version} at byte 4 (known: 1, 2, 3)")
    wide = version >= 2  # version 1 counted in 32 bits
    tensors = h.count("the tensor count", wide, 24, MAX_ITEMS)  # name length, dims, type, offset: 24 bytes at least
    kvs = h.count("the metadata key count", wide, 12, MAX_ITEMS)
    alignment = 32
    for i in range(kvs):
        key = h.string(f"metadata key {i}", wide)
        kind = h.u32(f"the type of {key}")
        value = h.value(kind, key, wide)
        if key == "general.alignment" and isinstance(value, int):
            if value <= 0 or value & (value - 1):
                raise _Corrupt(f"general.alignment is {value}, not a power of two")
            alignment = value
    extents = []
    for i in range(tensors):
        name = h.string(f"the name of tensor {i}", wide)
        dims = h.u32(f"the dimension count of {name}")
        if not 0 < dims <= MAX_DIMS:
            raise _Corrupt(f"tensor {name} has {dims} dimensions")
        shape = [h.u64(f"the shape of {name}") if wide else h.u32(f"the shape of {name}") for _ in range(dims)]
        kind = h.u32(f"the type of {name}")
        offset = h.u64(f"the data offset of {name}")
        if kind not in GGML_QUANT_SIZES:
            raise _Corrupt(f"tensor {name} has an unknown ggml type {kind}")
        block, block_bytes = GGML_QUANT_SIZES[kind]
        elements = 1
        for d in shape:
            elements *= d
        if elements % block:
            raise _Corrupt(f"tensor {name} of shape {shape} does not fill whole blocks of {block}")
        extents.append((name, offset, elements // block * block_bytes))
    start = -(-h.pos // alignment) * alignment
    for name, offset, nbytes in extents:
        end = start + offset + nbytes
        if end > h.size:
            raise _Truncated(f"the data of tensor {name}", end)
