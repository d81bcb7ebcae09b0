"""Quantized KV cache (--kv-cache-dtype int8 | int4): ONNX Runtime's quantized GroupQueryAttention
against a NumPy reference of the same quantization, scale calibration bounds, engines built with
it (manifest, scales file, composition with in-flight batching, --quantize and --kv-heads) and
the flag's bad values."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from enginesmith import LLM, SamplingParams
from enginesmith.compiler import kv_cache_calibration
from enginesmith.compiler.config import BuildConfig
from enginesmith.plugins.flash_attention import kv_quant, schema
from enginesmith.plugins.flash_attention.reference import flash_attention_reference
from enginesmith.runtime.engine_dir import read_manifest
from enginesmith.runtime.errors import BuildError
from enginesmith.runtime.ort_cpu_executor import OrtCpuExecutor
from tests.conftest import PROMPTS
from tests.test_flash_attention_plugin import plugin_model, rope_tables

# The kernel's output equals float attention over the dequantized cache up to fp32 rounding.
ATOL = 1e-5
DTYPES = ("int8", "int4")


def quantized_model(
    attrs: schema.FlashAttentionAttrs, dtype: str, key_scale: np.ndarray, value_scale: np.ndarray
) -> ort.InferenceSession:
    model = plugin_model(attrs)
    quant = kv_quant.KVCacheQuantization(dtype, key_scale[None], value_scale[None])
    kv_quant.QuantizeKVCachePass(quant)(model)
    proto = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(proto, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4, 2), (4, 1)], ids=["gqa", "mqa"])
@pytest.mark.parametrize("rotary", [0, 1], ids=["plain", "rotary"])
def test_quantized_cache_attention_matches_reference(
    dtype: str, heads: tuple[int, int], rotary: int
) -> None:
    """Rows at different lengths (prefill, decode, verify, idle), garbage past the lengths, new
    keys larger than the scales allow (clamped): output and stored cache as the NumPy model."""
    rng = np.random.default_rng(7)
    n, nkv, h, max_len = heads[0], heads[1], 16, 32
    attrs = schema.FlashAttentionAttrs(n, nkv, h, scale=0.25, rotary=rotary)
    key_scale = rng.uniform(0.5, 1.5, (nkv, h)).astype(np.float32) * 2 / kv_quant.qmax(8)
    if dtype == "int4":
        key_scale *= kv_quant.qmax(8) / kv_quant.qmax(4)
    value_scale = key_scale[::-1].copy()
    seqlens_k = np.array([3, 9, 8, 5], np.int32)
    query_seqlens = np.array([4, 1, 3, 0], np.int32)
    q = rng.standard_normal((4, 4, n * h), dtype=np.float32)
    k = 1.5 * rng.standard_normal((4, 4, nkv * h), dtype=np.float32)  # some beyond 2 * scale
    v = rng.standard_normal((4, 4, nkv * h), dtype=np.float32)
    # Stored caches full of valid codes (garbage beyond each row's length).
    floats = rng.standard_normal((2, 4, nkv, max_len, h), dtype=np.float32)
    stored_k = kv_quant.encode(floats[0], key_scale[:, None], dtype)
    stored_v = kv_quant.encode(floats[1], value_scale[:, None], dtype)
    feeds = dict(
        query=q,
        key=k,
        value=v,
        cache_key=stored_k,
        cache_value=stored_v,
        seqlens_k=seqlens_k,
        query_seqlens=query_seqlens,
    )
    cos = sin = None
    if rotary:
        cos, sin = rope_tables(max_len, h)
        feeds.update(cos_cache=cos, sin_cache=sin)
    session = quantized_model(attrs, dtype, key_scale, value_scale)
    out, got_k, got_v = session.run(None, feeds)

    ref_out, ref_k, ref_v = flash_attention_reference(
        attrs,
        q,
        k,
        v,
        kv_quant.decode(stored_k, key_scale[:, None], dtype),
        kv_quant.decode(stored_v, value_scale[:, None], dtype),
        seqlens_k,
        query_seqlens,
        cos,
        sin,
        store=kv_quant.reference_store(dtype, key_scale, value_scale),
    )
    assert got_k.dtype == kv_quant.cache_numpy_dtype(dtype)
    assert got_k.shape[-1] == kv_quant.cache_last_dim(dtype, h)
    for b, (total, valid) in enumerate(zip(seqlens_k + 1, query_seqlens, strict=True)):
        np.testing.assert_allclose(
            out[b, :valid], ref_out[b, :valid], atol=ATOL, err_msg=f"row {b}"
        )
        for got, ref, scale in ((got_k, ref_k, key_scale), (got_v, ref_v, value_scale)):
            codes = kv_quant.decode(got[b, :, :total], scale[:, None], dtype)
            # fp32 rotary vs the reference's float64 may round a code the other way: one step
            steps = np.abs(codes - ref[b, :, :total]) / scale[:, None]
            assert steps.max() <= 1.0 + 1e-4, f"row {b}: {steps.max()} steps"
            assert (steps > 0.5).mean() < 0.02, f"row {b}: {(steps > 0.5).mean():.3f} off"


def test_int4_packing_round_trip_and_clamping() -> None:
    q = np.arange(-8, 8, dtype=np.int8).reshape(2, 8)
    packed = kv_quant.pack_int4(q)
    assert packed.dtype == np.uint8 and packed.shape == (2, 4)
    assert packed[0, 0] == ((-8 + 8) | ((-7 + 8) << 4))  # low nibble = element 2i, q + 8
    np.testing.assert_array_equal(kv_quant.unpack_int4(packed), q)
    scale = np.ones(8, np.float32)
    big = np.array([100.0, -100.0, 3.4, -3.6, 0, 0, 0, 0], np.float32)
    assert kv_quant.quantize(big, scale, 4).tolist()[:4] == [7, -8, 3, -4]
    assert kv_quant.quantize(big * 10, scale, 8).tolist()[:2] == [127, -128]


def test_pair_norm_bounds_every_rotation() -> None:
    """A rotated key channel's bound holds at angles the calibration never saw."""
    rng = np.random.default_rng(3)
    keys = rng.standard_normal((64, 8))  # [T, head_dim], rotary over all 8, halves layout
    bound = kv_quant.pair_norm_absmax(keys, (8, False))
    assert np.all(bound >= np.abs(keys).max(axis=0))
    for angle in np.linspace(0, 2 * np.pi, 13):
        c, s = np.cos(angle), np.sin(angle)
        turned = np.concatenate(
            [keys[:, :4] * c - keys[:, 4:] * s, keys[:, 4:] * c + keys[:, :4] * s], axis=1
        )
        assert np.all(np.abs(turned).max(axis=0) <= bound + 1e-12)


def test_scale_calibration_bounds(tiny_engine) -> None:  # type: ignore[no-untyped-def]
    """Scales are headroom x the calibrated bound / qmax, and the bound covers every value seen
    on the calibration text: with int8's headroom (> 1) nothing calibrated is clamped."""
    from enginesmith.compiler.sources import load_model

    engine = tiny_engine("tiny-llama", max_batch=1, max_seq_len=128)
    manifest = read_manifest(engine)
    executor = OrtCpuExecutor(engine, manifest)
    rotary = kv_quant.rotary_pairs(ir.load(engine / "model.onnx"))
    assert rotary is not None
    tokenizer = load_model("tiny-llama").tokenizer
    calibrated = kv_cache_calibration.collect_kv_absmax(
        executor, tokenizer, num_tokens=100, rotary=rotary
    )
    keys = executor.cache_key_all[:, 0, :, :100]  # the last segment: all 100 tokens
    values = executor.cache_value_all[:, 0, :, :100]
    assert np.all(np.abs(keys).max(axis=2) <= calibrated.key_absmax + 1e-6)
    np.testing.assert_allclose(np.abs(values).max(axis=2), calibrated.value_absmax, rtol=1e-6)
    for dtype in DTYPES:
        quant = calibrated.quantization(dtype)
        limit = kv_quant.qmax(quant.bits)
        headroom = calibrated.headroom_for(dtype)
        worst = (np.abs(keys) / quant.key_scale[:, :, None]).max()
        assert worst <= limit / headroom + 1e-4
        np.testing.assert_allclose(
            quant.value_scale, calibrated.value_absmax * headroom / limit, rtol=1e-6
        )
    assert kv_cache_calibration.HEADROOM["int8"] > 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantized_cache_engine(tiny_engine, dtype: str) -> None:  # type: ignore[no-untyped-def]
    """The manifest records dtype, bit width, quant type, bytes per token and the scales file;
    the executor allocates the matching buffers; the build reports the cost."""
    fp32 = read_manifest(tiny_engine("tiny-llama", max_batch=2, max_seq_len=64))
    engine = tiny_engine("tiny-llama", max_batch=2, max_seq_len=64, kv_cache_dtype=dtype)
    manifest = read_manifest(engine)
    kv = manifest["kv_cache"]
    assert (kv["dtype"], kv["bit_width"], kv["quant_type"]) == (
        dtype,
        kv_quant.BITS[dtype],
        "PER_CHANNEL",
    )
    ratio = 4 if dtype == "int8" else 8
    assert kv["bytes_per_token"] * ratio == fp32["kv_cache"]["bytes_per_token"]
    assert kv["scales_file"] in manifest["files"]
    assert manifest["passes"][-1] == "quantize-kv-cache"
    quant = kv_cache_calibration.read_scales(engine)
    layers, heads, dim = (manifest["model"][k] for k in ("num_layers", "num_kv_heads", "head_dim"))
    assert quant.key_scale.shape == (layers, heads, dim) and quant.dtype == dtype
    executor = OrtCpuExecutor(engine, manifest)
    assert executor.cache_key_all.dtype == kv_quant.cache_numpy_dtype(dtype)
    assert executor.cache_key_all.shape[-1] == kv_quant.cache_last_dim(dtype, dim)
    report = json.loads((engine / "build_report.json").read_text())
    assert report["kv_cache"]["bytes_per_token"] == kv["bytes_per_token"]
    assert report["kv_cache"]["max_batch_2048_tokens_in_512_mib"] > 0
    assert 0 < report["quality"]["top1_agreement"] <= 1
    text = subprocess.run(
        [sys.executable, "-m", "enginesmith.runtime.cli", "inspect", str(engine)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"{dtype} (PER_CHANNEL" in text


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantized_cache_in_flight_batch_equals_alone(tiny_engine, dtype: str) -> None:  # type: ignore[no-untyped-def]
    """A mixed batch over a quantized cache generates what each request generates alone: rows
    never read each other's codes or scales."""
    engine = tiny_engine("tiny-llama", max_batch=4, max_seq_len=128, kv_cache_dtype=dtype)
    llm = LLM(engine)
    prompts = [f"{p} {i}" for i, p in enumerate(PROMPTS * 2)]
    params = [SamplingParams(max_tokens=4 + 5 * i, ignore_eos=True) for i in range(len(prompts))]
    alone = [llm.generate(p, sp)[0].token_ids for p, sp in zip(prompts, params, strict=True)]
    assert [o.token_ids for o in llm.generate(prompts, params)] == alone


def test_quantized_cache_composes_with_weight_quantization_and_kv_heads(tiny_engine) -> None:  # type: ignore[no-untyped-def]
    engine = tiny_engine(
        "tiny-llama",
        max_batch=2,
        max_seq_len=64,
        kv_cache_dtype="int4",
        quantize="int4",
        kv_heads=1,
    )
    manifest = read_manifest(engine)
    assert manifest["model"]["num_kv_heads"] == 1
    assert manifest["dtypes"]["weights"] == "int4"
    assert manifest["kv_cache"]["dtype"] == "int4"
    assert kv_cache_calibration.read_scales(engine).key_scale.shape[1] == 1
    out = LLM(engine).generate(PROMPTS[0], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert len(out.token_ids) == 5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kv_cache_dtype": "fp8"}, "--kv-cache-dtype must be one of float32, int8, int4"),
        (
            {"kv_cache_dtype": "int8", "backend": "tensorrt"},
            "runs in ONNX Runtime's CPU GroupQueryAttention only",
        ),
    ],
)
def test_bad_kv_cache_dtype(kwargs: dict[str, str], message: str, tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=message) as info:
        BuildConfig(model="tiny-llama", output=tmp_path / "e", **kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_bad_kv_cache_dtype_cli(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "enginesmith.compiler.cli", "tiny-llama", "-o", str(tmp_path / "e")]
        + ["--kv-cache-dtype", "int2"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("build-engine: error: argument")
