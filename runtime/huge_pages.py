"""Arrays on 2 MiB pages: what a decode step streams (the weights, the KV caches) and what the
bandwidth bound reads.

A decode step reads ~540 MB of weights once per token: on 4 KiB pages that is ~130,000 page
translations per step, on 2 MiB pages ~260. numpy madvises its large arrays for transparent
huge pages itself, yet on this VM they got none (AnonHugePages stayed 0), while a private,
2 MiB-aligned mapping madvised before its first touch gets them: huge_page_empty makes one.
Measured against copies on 4 KiB pages: the SmolLM2 step ~0.99x as long at either core
placement (scripts/compare_page_sizes.py; docs/benchmarks.md, "Huge pages").

Where the OS has no transparent huge pages (or madvise fails) the arrays are ordinary memory:
same values, same layout.
"""

from __future__ import annotations

import contextlib
import mmap
import sys

import numpy as np

HUGE_PAGE_BYTES = 2 << 20


def _private_mapping(nbytes: int) -> tuple[mmap.mmap, np.ndarray]:
    """A private anonymous mapping of NBYTES (zero-filled) and a uint8 view that holds it
    open. Private: a shared anonymous mapping is shmem, which follows shmem_enabled instead."""
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return mapping, np.frombuffer(mapping, np.uint8)


def huge_page_empty(shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
    """An uninitialized C-contiguous array, 2 MiB-aligned, madvised for transparent huge
    pages before any page is touched (the first write then faults in huge pages). The
    array keeps its mapping alive; it is unmapped with the last view of it."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if nbytes < HUGE_PAGE_BYTES or not sys.platform.startswith("linux"):
        return np.empty(shape, dtype)
    mapping, raw = _private_mapping(nbytes + HUGE_PAGE_BYTES)
    offset = (-raw.ctypes.data) % HUGE_PAGE_BYTES
    advise = getattr(mapping, "madvise", None)
    flag = getattr(mmap, "MADV_HUGEPAGE", None)
    if advise is not None and flag is not None:
        # THP off in this kernel: ordinary pages. OFFSET is page-aligned (so is the mapping).
        with contextlib.suppress(OSError):
            advise(flag, offset, nbytes)
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def small_page_empty(shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
    """An uninitialized array on 4 KiB pages even where the OS gives huge pages unasked (THP
    "always"): its mapping is madvised MADV_NOHUGEPAGE. The control for huge_page_empty
    (Linux only)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    mapping, raw = _private_mapping(nbytes)
    mapping.madvise(mmap.MADV_NOHUGEPAGE)
    return raw.view(dtype).reshape(shape)


def huge_page_copy(array: np.ndarray) -> np.ndarray:
    """A C-contiguous fp32 copy of ARRAY on huge pages (huge_page_empty)."""
    out = huge_page_empty(array.shape, np.float32)
    out[...] = array
    return out


def huge_page_bytes(array: np.ndarray) -> int | None:
    """Bytes of the mapping that holds ARRAY that are backed by huge pages (the mapping's
    AnonHugePages in /proc/self/smaps), or None where that is not readable."""
    address = array.ctypes.data
    inside = False
    try:
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                first = line.split(maxsplit=1)[0]
                if "-" in first and not first.endswith(":"):
                    low, high = (int(x, 16) for x in first.split("-"))
                    inside = low <= address < high
                elif inside and first == "AnonHugePages:":
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
