"""How long a cache line takes to travel between the decode kernels' two threads.

A decode step's threads hand data to each other at every phase boundary (the outputs each
wrote, the counters they wait on), so the step's cost depends on where the host put the two
cores: ~40 ns a handoff when they share an L3 (one CCX), ~190 ns when they do not. On this
VM the host moves the vCPUs between the two placements from one minute to the next, and
the read bandwidth moves with them (~50 GB/s on one CCX, ~80 GB/s on two:
scripts/core_handoff.py, docs/benchmarks.md): the benches record the handoff next to each
bandwidth sample to say which placement a measurement ran on.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from numba import get_num_threads, njit, prange

from enginesmith.runtime.intrinsics import atomic_add, atomic_load

SHARED_L3_MAX_NS = 100.0  # handoffs faster than this: the two cores share an L3
PLACEMENTS = {True: "one CCX (shared L3)", False: "two CCXs"}  # by shares_l3
_SPIN_LIMIT = 1 << 26  # spins before a thread gives up waiting for its partner
_TURN, _ARRIVED, _GAVE_UP = 0, 8, 16  # counters, each on a cache line of its own


@njit(parallel=True, cache=True)
def _ping_pong(sync, round_trips):  # type: ignore[no-untyped-def]
    """Two threads take turns incrementing one counter, each waiting to see the other's
    increment: 2 * ROUND_TRIPS one-way handoffs of the counter's cache line. A thread that
    waits _SPIN_LIMIT spins (its partner runs after it, not beside it) sets _GAVE_UP."""
    for _ in prange(2):
        me = atomic_add(sync, _ARRIVED, 1) % 2
        for i in range(round_trips):
            spins = 0
            while atomic_load(sync, _TURN) < 2 * i + me and atomic_load(sync, _GAVE_UP) == 0:
                spins += 1
                if spins > _SPIN_LIMIT:
                    atomic_add(sync, _GAVE_UP, 1)
            if atomic_load(sync, _GAVE_UP):
                break
            atomic_add(sync, _TURN, 1)


def core_handoff_ns(round_trips: int = 20_000) -> float | None:
    """The mean time of a one-way cache-line handoff between two numba threads, in ns, over
    ROUND_TRIPS round trips (~8 ms at 20,000 on two CCXs); None when fewer than two threads
    run (the two could not take turns)."""
    if get_num_threads() < 2:
        return None
    sync = np.zeros(3 * 8, np.int64)
    _ping_pong(sync, 16)  # compile or load, and wake the thread pool
    sync[:] = 0
    start = time.perf_counter()
    _ping_pong(sync, round_trips)
    elapsed = time.perf_counter() - start
    if sync[_GAVE_UP]:
        return None
    return elapsed / (2 * round_trips) * 1e9


def shares_l3(handoff_ns: float | None) -> bool | None:
    """Whether a handoff this fast means the two cores share an L3 (None: not measured)."""
    return None if handoff_ns is None else handoff_ns < SHARED_L3_MAX_NS


def placement(handoffs_ns: Sequence[float | None]) -> str | None:
    """The PLACEMENTS label that every one of HANDOFFS_NS (taken around one measurement)
    agrees on; None when they disagree (the host moved a core) or one was not measured."""
    verdicts = {shares_l3(h) for h in handoffs_ns}
    shared = verdicts.pop() if len(verdicts) == 1 else None
    return None if shared is None else PLACEMENTS[shared]


def by_placement(handoffs: Sequence[Sequence[float | None]]) -> dict[str, list[int]]:
    """For each PLACEMENTS label, the indices of the measurements whose handoffs (one sequence
    per measurement, taken around it) agree on it; one the host moved during is in none."""
    labels = [placement(h) for h in handoffs]
    return {
        label: [i for i, at in enumerate(labels) if at == label] for label in PLACEMENTS.values()
    }
