"""The compiled CPU decode kernels (runtime/decode_kernels.py) against ONNX Runtime on the same
engine and caches, and against transformers' greedy output; the graphs they refuse."""

from __future__ import annotations

import faulthandler

import numpy as np
import pytest

from enginesmith import LLM, SamplingParams
from enginesmith.compiler.artifact import read_manifest
from enginesmith.runtime.decode_plan import CompiledDecoder, DecodePlan, DecodePlanUnsupported
from enginesmith.runtime.session import EngineSession
from tests.conftest import PROMPTS, TINY_PRESETS
from tests.test_against_transformers import hf_greedy

LOGITS_RTOL = 1e-5  # relative to the largest |logit|; measured ~1e-6 (fp32, other sum order)


def prefilled_session(engine_dir, prompt_lengths: list[int]) -> EngineSession:  # type: ignore[no-untyped-def]
    """A session with decode kernels whose slots 0.. hold prompts of the given lengths."""
    session = EngineSession(engine_dir, read_manifest(engine_dir), decode_kernels=True)
    assert session.decoder is not None, session.decoder_unavailable
    rng = np.random.default_rng(0)
    for slot, n in enumerate(prompt_lengths):
        ids = rng.integers(3, session.vocab_size, (1, n))
        # A prompt step (S > 1) runs on ONNX Runtime.
        seqlens_k, valid = np.array([n - 1], np.int32), np.array([n], np.int32)
        session.step(slot, ids, np.arange(n)[None], seqlens_k, valid, np.array([n - 1]))
    return session


def kernels_vs_ort(session: EngineSession, ids, positions, valid) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """One decode step over slots [0, n) both ways from the same caches: (logit diff, cache diff)."""
    n = len(ids)
    caches = session.cache_key_all.copy(), session.cache_value_all.copy()
    assert session.decoder is not None
    ours = session.decoder.step(
        session.cache_key_all,
        session.cache_value_all,
        0,
        np.array(ids),
        np.where(np.array(valid) > 0, positions, -1),
        np.arange(n),
    )
    ours_caches = session.cache_key_all.copy(), session.cache_value_all.copy()
    session.cache_key_all[...], session.cache_value_all[...] = caches
    decoder, session.decoder = session.decoder, None
    ref = session.step(
        0,
        np.array(ids)[:, None],
        np.array(positions)[:, None],
        np.array(positions, np.int32),
        np.array(valid, np.int32),
        np.arange(n),
    )
    session.decoder = decoder
    active = np.array(valid) > 0
    logit_diff = float(np.abs(ours[active] - ref[active]).max() / np.abs(ref[active]).max())
    cache_diff = max(
        float(np.abs(a - b).max())
        for a, b in zip(ours_caches, (session.cache_key_all, session.cache_value_all), strict=True)
    )
    return logit_diff, cache_diff


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_decode_step_matches_onnxruntime(tiny_engine, preset: str) -> None:
    """GQA (llama), MQA + sliding window 16 past the window (mistral), MHA + q/k/v biases
    (qwen2): three rows at different lengths, one of them idle, several steps."""
    session = prefilled_session(tiny_engine(preset), [5, 40, 23])
    lengths = [5, 40, 23]
    for step in range(4):
        valid = [1, 1, 0] if step % 2 else [1, 1, 1]
        positions = list(lengths)
        logit_diff, cache_diff = kernels_vs_ort(session, [11 + step, 7, 19], positions, valid)
        assert logit_diff < LOGITS_RTOL, (preset, step, logit_diff)
        assert cache_diff < 1e-5, (preset, step, cache_diff)
        lengths = [n + v for n, v in zip(lengths, valid, strict=True)]


@pytest.mark.parametrize("preset", ("tiny-llama", "tiny-qwen2"))
def test_long_contexts_merge_chunks_exactly(tiny_engine, preset: str) -> None:
    """Contexts of several ATTENTION_CHUNK-key chunks (a partial last one included): the
    split-K softmax states of one KV head are merged as ONNX Runtime's one-pass softmax."""
    from enginesmith.runtime.decode_kernels import ATTENTION_CHUNK

    lengths = [2 * ATTENTION_CHUNK + 37, ATTENTION_CHUNK, 3]
    session = prefilled_session(tiny_engine(preset), lengths)
    logit_diff, cache_diff = kernels_vs_ort(session, [11, 7, 19], lengths, [1, 1, 1])
    assert logit_diff < LOGITS_RTOL, (preset, logit_diff)
    assert cache_diff < 1e-5, (preset, cache_diff)


@pytest.mark.parametrize("launched, numba_threads", [(3, 2), (2, 1), (1, 1)])
def test_step_is_exact_whatever_threads_actually_run(tiny_engine, launched, numba_threads) -> None:  # type: ignore[no-untyped-def]
    """The step's one parallel region gives each launched thread a segment of every phase and
    lets a thread take what another has not: with more launched segments than numba threads
    (one thread then runs two launches one after the other), a single numba thread, or a
    single launch, the step still finishes, and its logits and cache equal the ordinary
    launch's exactly; so do a greedy run's tokens and cache (a thread may then finish whole
    steps alone)."""
    import numba

    session = prefilled_session(tiny_engine("tiny-llama"), [9, 150])
    decoder = session.decoder
    assert decoder is not None
    caches = session.cache_key_all.copy(), session.cache_value_all.copy()

    def step() -> tuple[np.ndarray, np.ndarray]:
        session.cache_key_all[...], session.cache_value_all[...] = caches
        logits = decoder.step(
            session.cache_key_all, session.cache_value_all, 0, np.array([4, 8]),
            np.array([9, 150]), np.arange(2),
        )  # fmt: skip
        return logits, session.cache_key_all.copy()

    def greedy_run() -> tuple[np.ndarray, np.ndarray]:
        session.cache_key_all[...], session.cache_value_all[...] = caches
        tokens = decoder.greedy_run(
            session.cache_key_all, session.cache_value_all, 1, 8, 150, 6, np.zeros(0, np.int64)
        )
        return tokens, session.cache_key_all.copy()

    reference_logits, reference_cache = step()
    reference_tokens, reference_run_cache = greedy_run()
    ordinary, default_threads = decoder.threads, numba.get_num_threads()
    # A broken hand-over would spin forever: end the run with a traceback instead of a hang.
    faulthandler.dump_traceback_later(300, exit=True)
    decoder.threads = launched
    numba.set_num_threads(min(numba_threads, default_threads))
    try:
        logits, cache = step()
        tokens, run_cache = greedy_run()
    finally:
        faulthandler.cancel_dump_traceback_later()
        numba.set_num_threads(default_threads)
        decoder.threads = ordinary
    np.testing.assert_array_equal(logits, reference_logits)
    np.testing.assert_array_equal(cache, reference_cache)
    np.testing.assert_array_equal(tokens, reference_tokens)
    np.testing.assert_array_equal(run_cache, reference_run_cache)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_greedy_run_equals_single_steps(tiny_engine, preset: str) -> None:
    """A greedy run of K steps in one call makes the tokens and the cache that K single steps,
    each followed by np.argmax of its logits, make; it ends at a stop id, that token kept
    (the window case runs past mistral's sliding window of 16)."""
    session = prefilled_session(tiny_engine(preset), [30])
    decoder = session.decoder
    assert decoder is not None
    caches = session.cache_key_all.copy(), session.cache_value_all.copy()
    no_stop = np.zeros(0, np.int64)

    token, single = 5, []
    for position in range(30, 37):
        logits = decoder.step(session.cache_key_all, session.cache_value_all, 0,
                              np.array([token]), np.array([position]), np.zeros(1, np.int64))  # fmt: skip
        token = int(np.argmax(logits[0]))
        single.append(token)
    single_cache = session.cache_key_all.copy(), session.cache_value_all.copy()

    session.cache_key_all[...], session.cache_value_all[...] = caches
    run = decoder.greedy_run(session.cache_key_all, session.cache_value_all, 0, 5, 30, 7, no_stop)
    assert run.tolist() == single
    np.testing.assert_allclose(session.cache_key_all, single_cache[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(session.cache_value_all, single_cache[1], rtol=0, atol=1e-5)

    session.cache_key_all[...], session.cache_value_all[...] = caches
    stop = np.array([single[3]], np.int64)
    run = decoder.greedy_run(session.cache_key_all, session.cache_value_all, 0, 5, 30, 7, stop)
    assert run.tolist() == single[: single.index(single[3]) + 1]


def test_idle_row_leaves_its_cache_alone(tiny_engine) -> None:
    session = prefilled_session(tiny_engine("tiny-llama"), [6, 6])
    before = session.cache_key_all[:, 1].copy()
    assert session.decoder is not None
    session.decoder.step(
        session.cache_key_all,
        session.cache_value_all,
        0,
        np.array([5, 5]),
        np.array([6, -1]),
        np.array([0]),
    )
    np.testing.assert_array_equal(session.cache_key_all[:, 1], before)
    assert np.abs(session.cache_key_all[:, 0, :, 6]).max() > 0  # row 0's token was cached


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_greedy_decode_equals_transformers(tiny_engine, hf_models, monkeypatch, preset) -> None:  # type: ignore[no-untyped-def]
    """Batch-1 generation (every decode step on the kernels) gives transformers' tokens."""
    monkeypatch.delenv("ENGINESMITH_DECODE_KERNELS", raising=False)
    llm = LLM(tiny_engine(preset), decode_kernels=True)
    assert llm.session.decoder is not None
    loaded = hf_models(preset)
    for prompt in PROMPTS:
        (out,) = llm.generate(prompt, SamplingParams(max_tokens=24, ignore_eos=True))
        assert out.token_ids == hf_greedy(loaded, prompt, 24), prompt


def test_greedy_runs_give_single_steps_outputs(tiny_engine, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """LLM with greedy runs (8 steps a kernel call) and with a call per token give the same
    tokens, text and finish reason: a max_tokens that is no multiple of 8, a stop string and
    a stop token met inside a run (tokens after it dropped), a stream; and runs did happen."""
    monkeypatch.delenv("ENGINESMITH_DECODE_KERNELS", raising=False)
    engine = tiny_engine("tiny-llama")
    runs, single = LLM(engine, decode_kernels=True), LLM(engine, decode_kernels=True, greedy_run=1)
    calls: list[int] = []
    run_on_kernels = runs.session.greedy_run

    def counted(slot, token, position, steps, stop_ids):  # type: ignore[no-untyped-def]
        calls.append(steps)
        return run_on_kernels(slot, token, position, steps, stop_ids)

    monkeypatch.setattr(runs.session, "greedy_run", counted)
    prompt = PROMPTS[0]
    (reference,) = single.generate(prompt, SamplingParams(max_tokens=21, ignore_eos=True))
    (out,) = runs.generate(prompt, SamplingParams(max_tokens=21, ignore_eos=True))
    assert out.token_ids == reference.token_ids and out.text == reference.text
    assert out.finish_reason == reference.finish_reason == "length"
    assert calls and max(calls) == 8 and len(out.stats.decode_call_s) == 20

    stop_text = reference.text[len(reference.text) // 2 :][:3]
    stop_token = reference.token_ids[11]
    for params in (
        SamplingParams(max_tokens=21, ignore_eos=True, stop=[stop_text]),
        SamplingParams(max_tokens=21, ignore_eos=True, stop_token_ids=[stop_token]),
    ):
        (expected,) = single.generate(prompt, params)
        (got,) = runs.generate(prompt, params)
        assert expected.finish_reason == "stop"
        assert (got.token_ids, got.text, got.finish_reason) == (
            expected.token_ids, expected.text, expected.finish_reason,
        )  # fmt: skip
    stream = runs.stream(prompt, SamplingParams(max_tokens=21, ignore_eos=True))
    assert "".join(stream) == reference.text


def test_quantized_engine_is_refused_with_the_node(tiny_engine) -> None:
    engine = tiny_engine("tiny-llama", quantize="int8")
    with pytest.raises(DecodePlanUnsupported, match="fp32 weights only"):
        DecodePlan.from_engine(engine / "model.onnx")
    session = EngineSession(engine, read_manifest(engine), decode_kernels=True)
    assert session.decoder is None and "Quantized" in session.decoder_unavailable


def test_kernels_are_on_unless_turned_off(tiny_engine, monkeypatch) -> None:
    engine = tiny_engine("tiny-llama")
    manifest = read_manifest(engine)
    monkeypatch.delenv("ENGINESMITH_DECODE_KERNELS", raising=False)
    assert EngineSession(engine, manifest).decoder is not None
    off = EngineSession(engine, manifest, decode_kernels=False)
    assert off.decoder is None and "ENGINESMITH_DECODE_KERNELS=0" in off.decoder_unavailable
    monkeypatch.setenv("ENGINESMITH_DECODE_KERNELS", "0")
    assert EngineSession(engine, manifest).decoder is None
    assert EngineSession(engine, manifest, decode_kernels=True).decoder is not None


def test_steps_of_up_to_max_rows_run_on_the_kernels(tiny_engine) -> None:
    """Decode steps of 1..DECODE_KERNEL_MAX_ROWS rows take the kernels, wider ones and prompt
    steps ONNX Runtime (counted through the decoder's step)."""
    from enginesmith.runtime.session import DECODE_KERNEL_MAX_ROWS

    engine = tiny_engine("tiny-llama", max_batch=DECODE_KERNEL_MAX_ROWS + 1)
    session = prefilled_session(engine, [3] * (DECODE_KERNEL_MAX_ROWS + 1))
    assert session.decoder is not None
    calls: list[int] = []
    kernel_step = session.decoder.step

    def counted_step(*args):  # type: ignore[no-untyped-def]
        calls.append(len(args[3]))  # input_ids: one per row
        return kernel_step(*args)

    session.decoder.step = counted_step  # type: ignore[method-assign]
    for rows in (1, DECODE_KERNEL_MAX_ROWS, DECODE_KERNEL_MAX_ROWS + 1):
        ids = np.full((rows, 1), 5)
        pos = np.full((rows, 1), 3)
        session.step(
            0, ids, pos, np.full(rows, 3, np.int32), np.ones(rows, np.int32), np.arange(rows)
        )
    assert calls == [1, DECODE_KERNEL_MAX_ROWS]


def test_decoder_reads_the_windowed_span_only(tiny_engine) -> None:
    """Mistral's window (16) bounds the attention work items, whatever the context."""
    engine = tiny_engine("tiny-mistral")
    plan = DecodePlan.from_engine(engine / "model.onnx")
    assert plan.attention.local_window_size == 16
    decoder = CompiledDecoder(plan, max_batch=2, max_seq_len=1024, threads=2)  # 8 chunks unwindowed
    assert decoder._part_max.shape[0] == 2 * plan.attention.kv_num_heads * 1


def test_plan_weights_are_contiguous_rows(tiny_engine) -> None:
    """The kernels stream [N, K] rows: every stacked weight is C-contiguous, transposed from
    the graph's [K, N] MatMul weights."""
    engine = tiny_engine("tiny-llama")
    plan = DecodePlan.from_engine(engine / "model.onnx")
    for w in (plan.w_qkv, plan.w_o, plan.w_gate_up, plan.w_down, plan.lm_head):
        assert w.flags.c_contiguous and w.dtype == np.float32
    assert plan.w_qkv.shape[1] == plan.attention.packed_width


def test_step_thread_body_is_loaded_on_its_own_first(tiny_engine, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The step's thread body is compiled or loaded standalone before decode_step first runs
    (the JIT linker then runs that once-optimized copy,
    CompiledDecoder._load_step_thread_first), for the very argument types decode_step passes
    through: one body per step signature, none compiled a second time for other types."""
    from enginesmith.runtime import decode_kernels

    session = prefilled_session(tiny_engine("tiny-llama"), [4])
    decoder = session.decoder
    assert decoder is not None
    decoder._step_thread_loaded = False  # as in a new process
    body, step = decode_kernels._step_thread, decoder._run
    events: list[tuple[str, tuple[object, ...]]] = []
    real_compile = body.compile

    def compile_body(signature):  # type: ignore[no-untyped-def]
        events.append(("body", tuple(signature)))
        return real_compile(signature)

    def run_step(*args):  # type: ignore[no-untyped-def]
        events.append(("step", tuple(body.typeof_pyval(a) for a in args)))
        return step(*args)

    monkeypatch.setattr(body, "compile", compile_body)
    monkeypatch.setattr(decoder, "_run", run_step)
    for position in (4, 5):
        decoder.step(session.cache_key_all, session.cache_value_all, 0, np.array([9]),
                     np.array([position]), np.arange(1))  # fmt: skip
    assert [kind for kind, _ in events] == ["body", "step", "step"]
    assert events[0][1] == events[1][1]
    assert len(body.signatures) == len(decode_kernels.decode_step.signatures)


ATTENTION_RTOL = 1e-5  # relative to the largest |output|; fp32 kernels vs the float64 reference


@pytest.mark.parametrize(
    ("num_heads", "kv_num_heads", "window"),
    [(2, 2, -1), (4, 2, -1), (6, 2, -1), (8, 2, -1), (10, 2, 100), (7, 1, -1)],
    ids=["group1", "group2", "group3", "group4", "group5-window", "group7"],
)
def test_attention_matches_the_published_math(
    num_heads: int, kv_num_heads: int, window: int
) -> None:
    """The kernels' split-K attention against the plugin's float64 reference (softmax(q k^T
    scale) v over the cached keys) for query groups of 1 to 7 heads per KV head, with and
    without a window, over contexts of one key, of a partial last chunk and of several
    chunks (positions 0, 130, 257 of 128-key chunks)."""
    from enginesmith.plugins.flash_attention.reference import flash_attention_reference
    from enginesmith.plugins.flash_attention.schema import FlashAttentionAttrs
    from enginesmith.runtime import decode_kernels

    head_dim, max_len, chunk = 16, 300, decode_kernels.ATTENTION_CHUNK
    positions = np.array([0, 130, 257])
    rows, group = len(positions), num_heads // kv_num_heads
    rng = np.random.default_rng(num_heads * 10 + kv_num_heads)
    cache_k = rng.standard_normal((rows, kv_num_heads, max_len, head_dim)).astype(np.float32)
    cache_v = rng.standard_normal((rows, kv_num_heads, max_len, head_dim)).astype(np.float32)
    q = rng.standard_normal((rows, num_heads * head_dim)).astype(np.float32)
    # The new token's key and value are already in the cache (the step writes them first);
    # the reference writes them again, unchanged.
    new_k = np.stack([cache_k[m, :, p].reshape(-1) for m, p in enumerate(positions)])
    new_v = np.stack([cache_v[m, :, p].reshape(-1) for m, p in enumerate(positions)])
    qkv = np.concatenate([q, new_k, new_v], axis=1)
    attrs = FlashAttentionAttrs(num_heads, kv_num_heads, head_dim, head_dim**-0.5, window)
    want, _, _ = flash_attention_reference(
        attrs, qkv[:, None], None, None, cache_k, cache_v,
        positions.astype(np.int32), np.ones(rows, np.int32),
    )  # fmt: skip
    items = rows * kv_num_heads * decode_kernels.chunks_per_row(max_len, chunk)
    out = np.zeros((rows, num_heads * head_dim), np.float32)
    decode_kernels.attention_only(
        qkv, positions, cache_k[None], cache_v[None], num_heads, kv_num_heads, head_dim,
        np.float32(attrs.scale), window, chunk, np.zeros((items, group), np.float32),
        np.zeros((items, group), np.float32), np.zeros((items, group, head_dim), np.float32), out,
    )  # fmt: skip
    want = want[:, 0]
    assert np.abs(out - want).max() <= ATTENTION_RTOL * np.abs(want).max()


def test_vector_argmax_is_numpys() -> None:
    """intrinsics.argmax (the greedy run's token pick) gives np.argmax's index: lengths off the
    16-lane blocks, ties (the first wins), NaNs (the first NaN wins), all -inf, empty."""
    from numba import njit

    from enginesmith.runtime.intrinsics import argmax

    pick = njit(lambda values: argmax(values))
    rng = np.random.default_rng(0)
    for size in (1, 15, 16, 17, 100, 49157):
        for case in ("plain", "ties", "nan", "-inf"):
            values = rng.standard_normal(size).astype(np.float32)
            if case == "ties":
                values = np.round(values)
            elif case == "nan":
                values[rng.integers(size, size=2)] = np.nan
            elif case == "-inf":
                values[:] = -np.inf
            assert pick(values) == np.argmax(values), (size, case)
    assert pick(np.zeros(0, np.float32)) == 0


def test_phase_profiler_still_fits_the_kernels(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """scripts/profile_decode_phases.py times a copy of decode_kernels.py with time stamps
    edited in: every edit still finds its text the expected number of times, its phase names
    match PHASES_PER_LAYER, and the timed source is valid Python that stamps every phase's
    wait (a kernel change that breaks this fails here, not in someone's profiling run)."""
    import importlib.util
    import sys
    from pathlib import Path

    scripts = Path(__file__).resolve().parents[1] / "scripts"
    monkeypatch.syspath_prepend(str(scripts))
    spec = importlib.util.spec_from_file_location(
        "profile_decode_phases", scripts / "profile_decode_phases.py"
    )
    assert spec is not None and spec.loader is not None
    profiler = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, profiler)
    spec.loader.exec_module(profiler)

    source = profiler.timed_source()
    compile(source, "decode_kernels_timed.py", "exec")
    assert source.count("_stamp(sync, me, phase, t0, tsc())") == 2  # _end_serial, _finish_phase
    assert source.count("_end_serial(sync, phase, threads, weights_only, ran, me)") == 7
