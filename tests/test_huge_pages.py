"""Arrays on huge pages (runtime/huge_pages.py): what the decode step streams."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from enginesmith.runtime.decode_plan import _stack
from enginesmith.runtime.huge_pages import (
    HUGE_PAGE_BYTES,
    huge_page_bytes,
    huge_page_copy,
    huge_page_empty,
    small_page_empty,
)

THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_mode() -> str:
    """The bracketed transparent-huge-page mode ("always", "madvise", "never"), or "none"."""
    try:
        text = THP_SETTING.read_text()
    except OSError:
        return "none"
    return text[text.index("[") + 1 : text.index("]")]


def test_huge_page_arrays_are_aligned_contiguous_and_keep_values() -> None:
    source = np.random.default_rng(0).standard_normal((3, 1024, 1024), np.float32)
    copy = huge_page_copy(source)
    assert copy.shape == source.shape and copy.dtype == np.float32
    assert copy.flags.c_contiguous and copy.flags.writeable
    assert np.array_equal(copy, source)
    if sys.platform.startswith("linux"):
        assert copy.ctypes.data % HUGE_PAGE_BYTES == 0
    small = huge_page_empty((16, 16))  # under one huge page: plain numpy memory
    assert small.shape == (16, 16) and small.flags.owndata


def test_plan_weights_are_stacked_onto_huge_pages() -> None:
    layers = [np.full((512, 512), float(i), np.float32) for i in range(4)]  # 4 MiB in all
    stacked = _stack(layers)
    assert [float(stacked[i, 7, 9]) for i in range(4)] == [0.0, 1.0, 2.0, 3.0]
    if sys.platform.startswith("linux"):
        assert stacked.ctypes.data % HUGE_PAGE_BYTES == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps is Linux's")
def test_huge_pages_are_granted_where_the_kernel_allows_them() -> None:
    """The mapping reports huge pages when THP is on ("always" or "madvise"); a control mapping
    madvised MADV_NOHUGEPAGE reports none, so the measure can fail."""
    array = huge_page_empty((4, 1024, 1024))  # 16 MiB
    array.fill(1.0)  # the first touch faults the pages in
    control = small_page_empty((4, 1024, 1024))
    control.fill(1.0)
    assert huge_page_bytes(control) == 0
    granted = huge_page_bytes(array)
    if _thp_mode() in ("always", "madvise"):
        assert granted is not None and granted >= array.nbytes // 2
    else:
        assert not granted
