"""Where a compiled decode step's time goes, phase by phase: each weight product, the attention
items and each sequential piece (norms, rotary and cache write, softmax merge, SiLU product),
and how long each thread waited at each phase's end.

    .venv/bin/python scripts/profile_decode_phases.py ENGINE_DIR [--context 640] [--steps 60]

It runs a timed copy of runtime/decode_kernels.py: the committed source with a time-stamp
counter read (rdtsc, LLVM's readcyclecounter) where a thread starts waiting for a phase's end
and where it leaves; the stamps go to the end of the step's counter array. Everything else is
the committed code, but the stamps move the compiler's layout of the step a little (compare
totals with scripts/compare_kernel_variants.py, not with this). A phase's time runs from the
last thread leaving the phase before to the last thread leaving it.

STEPS 1-row steps after CONTEXT cached tokens (random cache contents), all at the same
position; the medians over the steps after the first three are printed per kind of phase
(summed over the layers), with the core placement measured before and after
(runtime/core_handoff.py: a step on two CCXs pays ~190 ns per cache-line handoff, on one ~40).
Writes JSON into the cache's bench/ folder.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
from compare_decode_kernels import kernel_session  # a neighbour in scripts/
from compare_kernel_variants import load_variant
from numba import njit

from enginesmith.compiler.presets import cache_dir
from enginesmith.runtime import decode_kernels
from enginesmith.runtime.bench import run_record, save_results
from enginesmith.runtime.core_handoff import core_handoff_ns, placement

# the committed kernels' phases of one layer, in order (decode_kernels._step_thread)
LAYER_PHASES = ("norm", "qkv", "rotary+cache", "attention", "merge", "o_proj", "norm2",
                "gate_up", "silu", "down")  # fmt: skip
STAMP_SLOTS = 4096  # per thread: [wait start, leave] per phase, the thread's start last

_STAMPS = """
from llvmlite import ir as _ir
from numba import types as _types
from numba.core import cgutils as _cgutils
from numba.extending import intrinsic as _intrinsic

STAMP_SLOTS = {slots}


@_intrinsic
def tsc(typingctx):  # type: ignore[no-untyped-def]
    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        fn = _cgutils.get_or_insert_function(
            builder.module, _ir.FunctionType(_ir.IntType(64), []), "llvm.readcyclecounter"
        )
        return builder.call(fn, [])

    return _types.int64(), codegen


@njit(cache=True, inline="always")
def _stamp(sync, me, slot, t0, t1):  # type: ignore[no-untyped-def]
    i = sync.shape[0] - (me + 1) * STAMP_SLOTS * 2 + slot * 2
    sync[i] = t0
    sync[i + 1] = t1
"""

# (committed text, timed text, how many times it occurs)
_EDITS = (
    ("ATTENTION_CHUNK = 128", _STAMPS.format(slots=STAMP_SLOTS) + "\nATTENTION_CHUNK = 128", 1),
    (
        "    return (phases * (threads + 1) + 1) * SYNC_STRIDE",
        f"    return (phases * (threads + 1) + 1) * SYNC_STRIDE + threads * {STAMP_SLOTS} * 2",
        1,
    ),
    (
        "def _end_serial(sync, phase, threads, weights_only, ran):",
        "def _end_serial(sync, phase, threads, weights_only, ran, me):",
        1,
    ),
    (
        "    _wait(sync, phase, threads, 0 if weights_only else 1)",
        "    t0 = tsc()\n    _wait(sync, phase, threads, 0 if weights_only else 1)\n"
        "    _stamp(sync, me, phase, t0, tsc())",
        1,
    ),
    (
        "def _finish_phase(sync, phase, threads, done, total):",
        "def _finish_phase(sync, phase, threads, done, total, me):",
        1,
    ),
    (
        "    _wait(sync, phase, threads, total)",
        "    t0 = tsc()\n    _wait(sync, phase, threads, total)\n    _stamp(sync, me, phase, t0, tsc())",
        1,
    ),
    (
        "_finish_phase(sync, phase, threads, done, blocks)",
        "_finish_phase(sync, phase, threads, done, blocks, me)",
        1,
    ),
    (
        "_finish_phase(sync, phase, threads, done, items)",
        "_finish_phase(sync, phase, threads, done, items, me)",
        1,
    ),
    (
        "_end_serial(sync, phase, threads, weights_only, ran)",
        "_end_serial(sync, phase, threads, weights_only, ran, me)",
        6,
    ),
    (
        "_end_serial(sync, phase, threads, False, ran)",
        "_end_serial(sync, phase, threads, False, ran, me)",
        1,
    ),
    (
        "    me = atomic_add(sync, _counter(per_step * steps, 0, threads), 1) % threads",
        "    started = tsc()\n"
        "    me = atomic_add(sync, _counter(per_step * steps, 0, threads), 1) % threads\n"
        "    _stamp(sync, me, STAMP_SLOTS - 1, started, started)",
        1,
    ),
)


def timed_source() -> str:
    """The committed decode kernels' source with the stamps in. Exits naming the edit that no
    longer fits when decode_kernels.py has changed under this script."""
    source = Path(decode_kernels.__file__).read_text()
    if len(LAYER_PHASES) != decode_kernels.PHASES_PER_LAYER:
        raise SystemExit("decode_kernels.PHASES_PER_LAYER changed: update LAYER_PHASES here")
    for old, new, count in _EDITS:
        found = source.count(old)
        if found != count:
            raise SystemExit(f"decode_kernels.py changed: {old.strip()!r} occurs {found} times, "
                             f"expected {count}; update _EDITS in {Path(__file__).name}")  # fmt: skip
        source = source.replace(old, new)
    return source


def timed_kernels() -> ModuleType:
    """timed_source() written to the cache (numba caches its compiled code next to the file)
    and imported."""
    source = timed_source()
    path = cache_dir() / "phase-profile" / "decode_kernels_timed.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text() != source:
        path.write_text(source)
    return load_variant(path)


def counter_hz(tsc: object) -> float:
    """Ticks per second of the time-stamp counter, over 0.3 s of wall time."""
    read = njit(lambda: tsc())  # type: ignore[operator]
    read()
    t0, c0 = time.perf_counter(), read()
    time.sleep(0.3)
    return (read() - c0) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("engine", type=Path, help="engine directory (onnxruntime, fp32)")
    p.add_argument("--context", type=int, default=640, help="tokens cached before each step")
    p.add_argument("--steps", type=int, default=60, help="steps timed (the first 3 are dropped)")
    p.add_argument("--json", type=Path, help="where to write the JSON (default: cache bench/)")
    args = p.parse_args()
    if args.steps < 4:
        p.error("--steps must be at least 4 (the first 3 are dropped)")

    session, decoder = kernel_session(args.engine)
    timed = timed_kernels()
    decoder.use_kernels(timed)
    layers, threads = decoder.plan.w_qkv.shape[0], decoder.threads
    phases = timed.phases_per_step(layers)
    if phases >= STAMP_SLOTS:
        raise SystemExit(f"{phases} phases a step: raise STAMP_SLOTS to more than that")
    hz = counter_hz(timed.tsc)
    used = timed.sync_counters(layers, threads)  # the step's counters: decoder._sync[:used]
    ids, positions = np.full(1, 7), np.full(1, args.context)

    before = core_handoff_ns()
    walls, spans, idles, inside = [], [], [], []
    for i in range(args.steps):
        start = time.perf_counter()
        decoder.step(
            session.cache_key_all, session.cache_value_all, 0, ids, positions, np.arange(1)
        )
        walls.append(time.perf_counter() - start)
        stamps = decoder._sync[used - threads * STAMP_SLOTS * 2 : used]
        stamps = stamps.reshape(threads, STAMP_SLOTS, 2)
        stamps = stamps.astype(np.float64) / hz * 1e6  # us
        if i < 3:
            continue
        left = stamps[:, : phases - 1, 1].max(axis=0)  # the last thread out of each phase
        began = np.concatenate([[stamps[:, STAMP_SLOTS - 1, 0].min()], left[:-1]])
        spans.append(left - began)
        inside.append(left[-1] - began[0])  # first thread's start to the last phase's end
        idles.append(stamps[:, : phases - 1, 1] - stamps[:, : phases - 1, 0])
    after = core_handoff_ns()
    where = placement([before, after])

    span, idle = np.median(spans, axis=0), np.median(idles, axis=0)
    per = len(LAYER_PHASES)
    rows: dict[str, dict[str, float]] = {}
    for k, name in enumerate(LAYER_PHASES):
        at = [layer * per + k for layer in range(layers)]
        rows[name] = {"us": float(span[at].sum())} | {
            f"thread {t} waits us": float(idle[t, at].sum()) for t in range(threads)
        }
    for k, name in ((layers * per, "final norm"), (layers * per + 1, "lm_head")):
        rows[name] = {"us": float(span[k])} | {
            f"thread {t} waits us": float(idle[t, k]) for t in range(threads)
        }
    total = sum(r["us"] for r in rows.values())

    wall_us = np.array(walls[3:]) * 1e6
    outside = float(np.median(wall_us - np.array(inside)))
    print(
        f"{args.steps - 3} steps after {args.context} cached tokens, {threads} threads, "
        f"placement {where or 'moved during the run'}: step {np.median(wall_us) / 1e3:.3f} ms "
        f"wall, of which {np.median(inside) / 1e3:.3f} ms from the first thread's start to "
        f"the last phase's end and {outside / 1e3:.3f} ms outside (the call from Python, the "
        f"launch, the return)"
    )
    print(f"per phase kind: medians per step, summed over {layers} layers (they add up to "
          f"{total / 1e3:.3f} ms: medians of skewed times add up to less than a median step)")  # fmt: skip
    waits = "".join(f"  t{t} waits us" for t in range(threads))
    print(f"{'phase':<14}{'us':>9}{'share':>8}{waits}")
    for name, r in rows.items():
        cells = "".join(f"{r[f'thread {t} waits us']:>13.1f}" for t in range(threads))
        print(f"{name:<14}{r['us']:>9.1f}{r['us'] / total:>8.1%}{cells}")
    record = run_record(
        args, placement=where, handoff_ns=[before, after], step_ms=list(wall_us / 1e3),
        kernel_us=inside, phases=rows,
    )  # fmt: skip
    print(f"JSON: {save_results(record, args.json, 'decode-phases')}")


if __name__ == "__main__":
    sys.exit(main())
