"""Static scales for --kv-cache-dtype int8 | int4, calibrated on the built engine itself.

ONNX Runtime's quantized GroupQueryAttention cache has static scales, one per (layer, KV head,
channel) (plugins/flash_attention/kv_quant.py). They are measured on what the cache really
holds: the freshly written fp32-cache engine prefills calibration text (default: the
calibration half of Python's pydoc docs, `quality.calibration_text()`; `--calibration FILE`
overrides it) in independent segments, and after each segment the largest |k| and |v| of every
channel is read straight out of the executor's cache buffers. Keys are post-rotary and, when the
engine has them, after KV-head collapse and weight quantization: the scales fit the engine's own
numbers. Keys have a few outlier channels (KIVI, arXiv 2402.02750), hence per-channel scales.

scale = HEADROOM * max|x| / qmax, qmax = 127 (int8) or 7 (int4). Values beyond the scale's range
are clamped by the kernel. At 8 bits resolution is cheap and clamping is not, so int8 leaves
room for text unlike the calibration text; at 4 bits resolution dominates, and clamping the
rare largest values is the better trade (a headroom below 1).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from enginesmith.compiler import kv_calibration
from enginesmith.plugins.flash_attention import kv_quant
from enginesmith.runtime.errors import BuildError

CALIBRATION_TOKENS = 2048
SEGMENT_TOKENS = 512  # each segment is prefilled from position 0 in one engine step
# Measured on SmolLM2, 2048 held-out tokens, fp32 perplexity 15.400 (docs/benchmarks.md "Lossy
# options"): int8 15.438 / 15.451 / 15.596 at x1.0 / 1.2 / 0.8 (1.2: margin for unseen text at
# +0.3%); int4 22.7 / 27.3 / 21.5 at x1.0 / 1.2 / 0.8.
HEADROOM = {"int8": 1.2, "int4": 0.8}
SCALES_FILE = "kv_scales.json"
_MIN_ABSMAX = 1e-6  # a channel that never moved still needs a positive scale


@dataclass
class KVCacheCalibration:
    """Per (layer, KV head, channel) largest |k| and |v| seen on the calibration text."""

    key_absmax: np.ndarray  # [layers, kv_heads, head_dim]
    value_absmax: np.ndarray
    tokens: int
    source: str
    seconds: float
    headroom: float | None = None  # None: HEADROOM of the dtype

    def headroom_for(self, dtype: str) -> float:
        return self.headroom if self.headroom is not None else HEADROOM[dtype]

    def quantization(self, dtype: str) -> kv_quant.KVCacheQuantization:
        """The cache format DTYPE with scales = headroom * absmax / qmax."""
        limit = kv_quant.qmax(kv_quant.BITS[dtype])
        headroom = self.headroom_for(dtype)

        def scale(absmax: np.ndarray) -> np.ndarray:
            return (np.maximum(absmax, _MIN_ABSMAX) * headroom / limit).astype(np.float32)

        return kv_quant.KVCacheQuantization(dtype, scale(self.key_absmax), scale(self.value_absmax))

    def summary(self, dtype: str) -> dict[str, Any]:
        """Figures for the build report: how spread the channels are (outliers)."""
        return {
            "tokens": self.tokens,
            "source": self.source,
            "seconds": round(self.seconds, 2),
            "headroom": self.headroom_for(dtype),
            "key_absmax_max": round(float(self.key_absmax.max()), 4),
            "key_absmax_median": round(float(np.median(self.key_absmax)), 4),
            "value_absmax_max": round(float(self.value_absmax.max()), 4),
            "value_absmax_median": round(float(np.median(self.value_absmax)), 4),
        }


def collect_kv_absmax(
    executor: Any,
    tokenizer: Any,
    calibration: Path | None = None,
    num_tokens: int = CALIBRATION_TOKENS,
    headroom: float | None = None,
    rotary: tuple[int, bool] | None = None,
) -> KVCacheCalibration:
    """Prefill calibration text through EXECUTOR (an OrtCpuExecutor with an fp32 cache) and read
    the largest |k|, |v| per layer, KV head and channel out of its cache buffers. ROTARY
    (rotary_dim, interleaved; kv_quant.rotary_pairs) bounds rotated key channels by their
    pair's norm, which holds at every position, not just the calibrated ones."""
    start = time.perf_counter()
    text, source = kv_calibration.calibration_source(calibration)
    ids = tokenizer(text).input_ids[:num_tokens]
    if len(ids) < 16:
        raise BuildError(
            f"calibration text {source} has only {len(ids)} tokens; pass a longer --calibration"
        )
    cache_key, cache_value = executor.cache_key_all, executor.cache_value_all
    if cache_key.dtype != np.float32:
        raise BuildError("KV scales are calibrated on an fp32-cache engine [developer error]")
    # [layers, max_batch, kv_heads, max_seq_len, head_dim] -> [layers, kv_heads, head_dim]
    key_absmax = np.zeros((cache_key.shape[0], cache_key.shape[2], cache_key.shape[4]))
    value_absmax = np.zeros_like(key_absmax)
    segment = min(SEGMENT_TOKENS, executor.max_seq_len)
    for s in range(0, len(ids), segment):
        chunk = ids[s : s + segment]
        n = len(chunk)
        executor.step(
            0,
            np.array([chunk], np.int64),
            np.arange(n, dtype=np.int64)[None],
            np.array([n - 1], np.int32),
            np.array([n], np.int32),
            np.array([n - 1], np.int64),
        )
        keys = cache_key[:, 0, :, :n]  # [layers, kv_heads, n, head_dim]
        np.maximum(key_absmax, kv_quant.pair_norm_absmax(keys, rotary), out=key_absmax)
        np.maximum(value_absmax, np.abs(cache_value[:, 0, :, :n]).max(axis=2), out=value_absmax)
    return KVCacheCalibration(
        key_absmax=key_absmax,
        value_absmax=value_absmax,
        tokens=len(ids),
        source=source,
        seconds=time.perf_counter() - start,
        headroom=headroom,
    )


def write_scales(
    engine_dir: Path, calibration: KVCacheCalibration, quant: kv_quant.KVCacheQuantization
) -> str:
    """Write the scales and the figures they came from as JSON (hashed with the engine, read by
    people and tools; the graph holds the same scales as initializers). Return its name."""
    body = {
        "dtype": quant.dtype,
        "bit_width": quant.bits,
        "quant_type": kv_quant.QUANT_TYPE,
        "layout": "[layers][kv_heads][head_dim]; value = q * scale",
        "calibration": calibration.summary(quant.dtype),
        "key_scale": np.round(quant.key_scale.astype(np.float64), 9).tolist(),
        "value_scale": np.round(quant.value_scale.astype(np.float64), 9).tolist(),
    }
    (engine_dir / SCALES_FILE).write_text(json.dumps(body) + "\n")
    return SCALES_FILE


def read_scales(engine_dir: Path) -> kv_quant.KVCacheQuantization:
    """The quantization recorded in an engine's SCALES_FILE."""
    body = json.loads((engine_dir / SCALES_FILE).read_text())
    return kv_quant.KVCacheQuantization(
        body["dtype"],
        np.asarray(body["key_scale"], np.float32),
        np.asarray(body["value_scale"], np.float32),
    )


def kv_cache_entry(
    dtype: str, num_layers: int, kv_heads: int, head_dim: int, max_batch: int, max_seq_len: int
) -> dict[str, Any]:
    """The manifest's kv_cache sizes for a cache of DTYPE."""
    per_token = int(2 * num_layers * kv_heads * head_dim * kv_quant.bytes_per_element(dtype))
    return {
        "dtype": dtype,
        "bytes_per_token": per_token,
        "total_bytes": per_token * max_batch * max_seq_len,
    }


def largest_batch(bytes_per_token: int, budget_bytes: int = 512 << 20, seq_len: int = 2048) -> int:
    """Sequences of SEQ_LEN tokens whose KV cache fits BUDGET_BYTES (the trade-off figure)."""
    return budget_bytes // (bytes_per_token * seq_len)


def quantize_engine_kv_cache(
    engine_dir: Path,
    manifest: dict[str, Any],
    model: Any,  # the engine's ir.Model, already written to ENGINE_DIR with an fp32 cache
    tokenizer: Any,
    dtype: str,
    calibration: Path | None = None,
) -> dict[str, Any]:
    """Calibrate the scales on the fp32-cache engine in ENGINE_DIR, rewrite its graph for a DTYPE
    cache, write SCALES_FILE and update MANIFEST (kv_cache, passes, files_by_role) in place.
    Return the build report's figures."""
    from enginesmith.compiler.backends import onnxruntime as ort_backend
    from enginesmith.runtime.ort_cpu_executor import OrtCpuExecutor

    executor = OrtCpuExecutor(engine_dir, {**manifest, "max_batch": 1})
    calibrated = collect_kv_absmax(
        executor, tokenizer, calibration, rotary=kv_quant.rotary_pairs(model)
    )
    del executor  # its session maps the files about to be rewritten
    quant = calibrated.quantization(dtype)
    rewrite = kv_quant.QuantizeKVCachePass(quant)
    rewrite(model)
    manifest["files_by_role"] = ort_backend.write_engine_files(model, tokenizer, engine_dir)
    manifest["files_by_role"]["kv_scales"] = write_scales(engine_dir, calibrated, quant)
    manifest["passes"].append(rewrite.name)
    kv = manifest["kv_cache"]
    fp32_per_token = kv["bytes_per_token"]
    _, kv_heads, _, head_dim = kv["shape_per_layer"]
    kv.update(
        kv_cache_entry(
            dtype,
            manifest["model"]["num_layers"],
            kv_heads,
            head_dim,
            manifest["max_batch"],
            manifest["max_seq_len"],
        )
    )
    kv.update(
        {
            "bit_width": quant.bits,
            "quant_type": kv_quant.QUANT_TYPE,
            "storage_last_dim": kv_quant.cache_last_dim(dtype, head_dim),
            "scales_file": SCALES_FILE,
        }
    )
    return {
        **rewrite.report,
        "calibration": calibrated.summary(dtype),
        "bytes_per_token": kv["bytes_per_token"],
        "bytes_per_token_fp32": fp32_per_token,
        "max_batch_2048_tokens_in_512_mib": largest_batch(kv["bytes_per_token"]),
        "max_batch_2048_tokens_in_512_mib_fp32": largest_batch(fp32_per_token),
    }
