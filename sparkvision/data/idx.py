"""The IDX format of MNIST and Fashion-MNIST (http://yann.lecun.com/exdb/mnist/), gzipped or raw.

A hand-written parser because the format is 10 lines of spec and no maintained library reads it
without also downloading data sets.
"""

from __future__ import annotations

import gzip
import re
import struct

import numpy as np

_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


class IDXError(ValueError):
    pass


def parse_idx(data: bytes, name: str = "<idx>") -> np.ndarray:
    """Parse IDX bytes (gzip detected by magic) into an array of the declared shape."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except Exception as e:  # noqa: BLE001
            raise IDXError(f"{name}: corrupt gzip stream ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise IDXError(f"{name}: not an IDX file (bad magic {data[:4].hex()})")
    dtype_code, ndim = data[2], data[3]
    if dtype_code not in _DTYPES:
        raise IDXError(f"{name}: unknown IDX element type 0x{dtype_code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXError(f"{name}: truncated header")
    dims = struct.unpack(">" + "I" * ndim, data[4:header])
    dtype = np.dtype(_DTYPES[dtype_code])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - header < expected:
        raise IDXError(f"{name}: truncated: {len(data) - header} data bytes, header promises {expected}")
    return np.frombuffer(data, dtype=dtype, count=int(np.prod(dims)), offset=header).reshape(dims)


_PAIR = re.compile(r"^(?P<prefix>.*?)[-_.]?(?P<kind>images|labels)[-_.]idx(?P<nd>\d)[-_.]ubyte(?:\.gz)?$")


def split_of_prefix(prefix: str) -> str:
    p = prefix.lower()
    if "t10k" in p or "test" in p:
        return "test"
    if "val" in p:
        return "val"
    return "train"


def pair_idx_files(names: list[str]) -> list[tuple[str, str, str | None]]:
    """Group file names into ``(split, images_name, labels_name_or_None)`` by their shared prefix."""
    groups: dict[str, dict[str, str]] = {}
    for full in names:
        base = full.rstrip("/").rsplit("/", 1)[-1]
        m = _PAIR.match(base)
        if m:
            groups.setdefault(m.group("prefix"), {})[m.group("kind")] = full
    out = []
    for prefix, kinds in sorted(groups.items()):
        if "images" in kinds:
            out.append((split_of_prefix(prefix), kinds["images"], kinds.get("labels")))
    return out


def looks_like_idx(name: str) -> bool:
    return bool(_PAIR.match(name.rstrip("/").rsplit("/", 1)[-1]))
