"""GPU backends from the same fused IR: TensorRT (model.plan) and ONNX Runtime on CUDA.

Both start from the backend-neutral FlashAttention graph and share one TensorRT-ready ONNX form:

    fuse-attention -> cleanup -> [collapse-kv-heads]
      -> lower-flash-attention-trt (KV update + attention ops, static cache capacity)
      -> convert-float (fp16/bf16: TensorRT 11 networks are strongly typed)

`--backend tensorrt` writes that graph (model.onnx) and builds model.plan from it with one
optimization profile per step shape (decode, prefill) computed from BuildConfig. With
`--onnx-only` it stops after model.onnx, which needs neither TensorRT nor a GPU.
`--backend onnxruntime-gpu` writes the same graph with the standard-ONNX op set
(TensorScatter + Attention), which ONNX Runtime's CUDA provider runs (onnxruntime-gpu 1.31 has
no GroupQueryAttention query_seqlens input, so the CPU backend's lowering cannot serve it).

TensorRT is found as the `tensorrt` module (NVIDIA's full TensorRT, from NVIDIA's package index)
or as `tensorrt_rtx` (TensorRT for RTX, whose wheels are on PyPI). TensorRT-RTX builds ahead of
time without a GPU (its kernels are compiled on the target at load time); full TensorRT tunes
kernels on the build machine's GPU and needs one.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from enginesmith.compiler.backends import onnxruntime as ort_backend
from enginesmith.runtime.errors import BuildError
from enginesmith.runtime.tensorrt_lib import TensorRT, find_tensorrt

if TYPE_CHECKING:
    from enginesmith.compiler.config import BuildConfig
    from enginesmith.compiler.export import ModelDims

PLAN_FILE = "model.plan"
ATTENTION_OPS = ("auto", "trt", "onnx")
HARDWARE_COMPAT = ("none", "ampere-plus", "same-cc")
# Build-time logit check of a GPU engine against transformers' fp32 logits, relative to the
# largest |logit|. fp16 measured 1e-3 on the tiny models (ONNX Runtime CPU, same graph).
VERIFY_RTOL = {"float16": 2e-2, "bfloat16": 6e-2}
# TensorRT-RTX's targets when none is set (its "CPU-only AOT" guide: compute capability 8.0,
# 8.6, 8.9, 12.0 "and later"); its 1.7.1 ComputeCapability enum has no SM90 (Hopper).
RTX_DEFAULT_TARGETS = ("8.0", "8.6", "8.9", "12.0")


# -- optimization profiles ----------------------------------------------------------------


@dataclass(frozen=True)
class ShapeRange:
    """min / opt / max shape of one network input in an optimization profile."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class OptimizationProfile:
    """One TensorRT optimization profile: a shape range for every network input."""

    name: str
    shapes: dict[str, ShapeRange]

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shapes": {k: dataclasses.asdict(v) for k, v in self.shapes.items()},
        }


def max_step_tokens(max_seq_len: int, max_num_tokens: int) -> int:
    """The most new tokens one row of one engine call can carry (S)."""
    return min(max_num_tokens, max_seq_len)


def kv_cache_capacity(max_seq_len: int, max_num_tokens: int) -> int:
    """Sequence capacity C of every cache buffer: max_seq_len plus a scratch tail of S_max
    positions where idle and padded rows write (plugins/flash_attention/tensorrt.py)."""
    return max_seq_len + max_step_tokens(max_seq_len, max_num_tokens)


def optimization_profiles(
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    max_batch: int,
    max_seq_len: int,
    max_num_tokens: int,
) -> tuple[OptimizationProfile, ...]:
    """Profiles for the engine's two step shapes, from the build's capacity settings.

    0 "decode": S = 1, up to max_batch rows, tuned at max_batch (single-token steps of every
      running request; speculative verify steps use the prefill profile).
    1 "prefill": S up to the per-step token budget, tuned at a full budget on one row (a
      prefill chunk), up to max_batch rows (adjacent chunks share a call).
    logits_indices covers one logit row per new token up to the token budget (verification
    asks for K + 1 rows per request). Cache buffers have the static capacity C.
    """
    s_max = max_step_tokens(max_seq_len, max_num_tokens)
    capacity = kv_cache_capacity(max_seq_len, max_num_tokens)
    m_max = max(max_batch, s_max)

    def profile(name: str, s: ShapeRange, rows_opt: int, logits_opt: int) -> OptimizationProfile:
        rows = ShapeRange((1,), (rows_opt,), (max_batch,))
        shapes = {
            "input_ids": s,
            "position_ids": s,
            "logits_indices": ShapeRange((1,), (logits_opt,), (m_max,)),
            "seqlens_k": rows,
            "query_seqlens": rows,
        }
        for layer in range(num_layers):
            for kind in ("key", "value"):
                shapes[f"past_{kind}.{layer}"] = ShapeRange(
                    (1, num_kv_heads, capacity, head_dim),
                    (rows_opt, num_kv_heads, capacity, head_dim),
                    (max_batch, num_kv_heads, capacity, head_dim),
                )
        return OptimizationProfile(name, shapes)

    decode = profile(
        "decode", ShapeRange((1, 1), (max_batch, 1), (max_batch, 1)), max_batch, max_batch
    )
    prefill = profile("prefill", ShapeRange((1, 1), (1, s_max), (max_batch, s_max)), 1, 1)
    return decode, prefill


def profiles_for(config: BuildConfig, dims: ModelDims) -> tuple[OptimizationProfile, ...]:
    return optimization_profiles(
        dims.num_layers,
        dims.num_kv_heads,
        dims.head_dim,
        config.max_batch,
        config.max_seq_len,
        config.max_num_tokens,
    )


# -- pipelines ----------------------------------------------------------------------------


def attention_ops(config: BuildConfig | None, sliding_window: int | None) -> str:
    """The op set the lowering emits: TRT_* ops for TensorRT unless the model has a sliding
    window (TRT_Attention cannot combine its causal kind with a window mask) or the backend is
    ONNX Runtime (which implements only the standard ops)."""
    backend = config.backend if config is not None else "tensorrt"
    choice = config.trt_attention if config is not None else "auto"
    if backend == "onnxruntime-gpu":
        return "onnx"
    if choice == "auto":
        return "onnx" if sliding_window else "trt"
    return choice


def gpu_dtype(config: BuildConfig | None) -> str:
    return (config.dtype if config is not None else None) or "float16"


# -- TensorRT -----------------------------------------------------------------------------


def check_build_environment(config: BuildConfig) -> None:
    """Fail before the minute-long export when the backend's build cannot run here."""
    if config.backend == "tensorrt" and not config.onnx_only:
        trt = find_tensorrt()
        if trt.rtx and config.trt_version_compatible:
            raise BuildError(
                f"TensorRT-RTX {trt.version} cannot build version-compatible plans (they embed "
                "the lean runtime of the full TensorRT): drop --trt-version-compatible"
            )
        if not trt.rtx:  # full TensorRT tunes kernels on the build GPU
            from enginesmith.runtime import cuda

            cuda.require_gpu(
                f"building a TensorRT {trt.version} engine (full TensorRT tunes kernels on the "
                "target GPU; TensorRT-RTX or --onnx-only build without one)"
            )


def cannot_verify(config: BuildConfig) -> str | None:
    """Why the built engine cannot be run here to check its logits (None: it can)."""
    from enginesmith.runtime import cuda

    if config.backend == "tensorrt" and config.onnx_only:
        return "--onnx-only wrote no model.plan"
    if cuda.device_count() == 0:
        return "no NVIDIA GPU here (run scripts/gpu-verify on a GPU machine)"
    return None


class _Logger:
    """TensorRT logger that keeps warnings and errors for the one-line build error."""

    def __init__(self, trt: Any, log: Callable[[str], None]) -> None:
        outer = self

        class Logger(trt.ILogger):  # type: ignore[misc, name-defined]
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity: Any, msg: str) -> None:
                level = int(severity)  # INTERNAL_ERROR 0, ERROR 1, WARNING 2, INFO 3
                if level <= int(trt.ILogger.Severity.ERROR):
                    outer.errors.append(msg)
                elif level <= int(trt.ILogger.Severity.WARNING):
                    outer.warnings.append(msg)

        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.logger = Logger()
        self.log = log


def build_plan(
    onnx_path: Path,
    plan_path: Path,
    profiles: tuple[OptimizationProfile, ...],
    *,
    hardware_compat: str = "none",
    version_compatible: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Parse ONNX_PATH with TensorRT's ONNX parser, build with PROFILES, write PLAN_PATH.

    Returns the manifest's "tensorrt" entry: module and version, target compute capabilities,
    compatibility choices, profiles and build time.
    """
    found = find_tensorrt()
    trt = found.module
    logger = _Logger(trt, log)
    builder = trt.Builder(logger.logger)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:  # always on in TensorRT 11; an explicit flag in 10.x
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger.logger)
    if not parser.parse_from_file(str(onnx_path)):
        first = parser.get_error(0) if parser.num_errors else None
        detail = first.desc() if first is not None else "; ".join(logger.errors[-1:])
        node = f" at node {first.node_name()} ({first.node_op()})" if first is not None else ""
        raise BuildError(
            f"TensorRT {found.version}'s ONNX parser rejected the graph{node}: {detail}; "
            "rebuild with --trt-attention onnx, or report it with build_report.json"
        )
    config = builder.create_builder_config()
    for spec in profiles:
        profile = builder.create_optimization_profile()
        for name, r in spec.shapes.items():
            profile.set_shape(name, r.min, r.opt, r.max)
        config.add_optimization_profile(profile)
    level = {
        "none": "NONE",
        "ampere-plus": "AMPERE_PLUS",
        "same-cc": "SAME_COMPUTE_CAPABILITY",
    }[hardware_compat]
    if hardware_compat != "none":
        if not hasattr(trt.HardwareCompatibilityLevel, level):
            raise BuildError(
                f"TensorRT {found.version} has no hardware-compatibility level {level}: "
                "build with --trt-hardware-compat none or ampere-plus"
            )
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, level)
    if version_compatible:
        if found.rtx:  # measured with 1.7.1: the build looks for libnvinfer_lean.so.1
            raise BuildError(
                f"TensorRT-RTX {found.version} cannot build version-compatible plans (they embed "
                "the lean runtime of the full TensorRT): drop --trt-version-compatible"
            )
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    targets = _set_compute_capabilities(found, config)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        reason = logger.errors[-1] if logger.errors else "no reason given"
        raise BuildError(
            f"TensorRT {found.version} could not build the engine: {reason.splitlines()[0]}"
        )
    plan_path.write_bytes(bytes(serialized))
    return {
        "module": found.name,
        "version": found.version,
        "compute_capabilities": targets,
        "hardware_compatibility": hardware_compat,
        "version_compatible": version_compatible,
        "profiles": [p.as_dict() for p in profiles],
        "build_seconds": round(seconds, 3),
        "plan": PLAN_FILE,
    }


def _set_compute_capabilities(found: TensorRT, config: Any) -> list[str]:
    """The compute capabilities the plan runs on, as "major.minor" strings.

    Full TensorRT: the build GPU's. TensorRT-RTX: the GPU's when one is visible (CURRENT),
    else the library's portable default set (no GPU needed to build)."""
    from enginesmith.runtime import cuda

    trt = found.module
    if not found.rtx:
        major, minor = cuda.compute_capability()
        return [f"{major}.{minor}"]
    if cuda.device_count() > 0:
        config.num_compute_capabilities = 1
        config.set_compute_capability(trt.ComputeCapability.CURRENT, 0)
        major, minor = cuda.compute_capability()
        return [f"{major}.{minor}"]
    names = [config.get_compute_capability(i).name for i in range(config.num_compute_capabilities)]
    if not names:  # the library's portable default set
        return list(RTX_DEFAULT_TARGETS)
    return [f"{n[2:-1]}.{n[-1]}" if n.startswith("SM") else n for n in names]


# -- engine files and manifest ----------------------------------------------------------------


def write_engine_files(
    model: ir.Model,
    tokenizer: Any,
    out_dir: Path,
    config: BuildConfig,
    dims: ModelDims,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, str], dict[str, Any]]:
    """Write model.onnx (+ weights) and the tokenizer; build model.plan for --backend tensorrt.

    Returns (file roles, the manifest's "tensorrt" entry or {} for ONNX Runtime on CUDA).
    """
    roles = ort_backend.write_engine_files(model, tokenizer, out_dir)
    if config.backend != "tensorrt":
        return roles, {}
    profiles = profiles_for(config, dims)
    if config.onnx_only:
        return roles, {
            "plan": None,
            "onnx_only": True,
            "profiles": [p.as_dict() for p in profiles],
        }
    entry = build_plan(
        out_dir / roles["model"],
        out_dir / PLAN_FILE,
        profiles,
        hardware_compat=config.trt_hardware_compat,
        version_compatible=config.trt_version_compatible,
        log=log,
    )
    roles["plan"] = PLAN_FILE
    return roles, entry


def manifest_entries(
    config: BuildConfig, dims: ModelDims, trt_entry: dict[str, Any], lowering: dict[str, Any]
) -> dict[str, Any]:
    """Manifest fields that differ from the ONNX Runtime CPU engine's."""
    dtype = gpu_dtype(config)
    capacity = kv_cache_capacity(config.max_seq_len, config.max_num_tokens)
    kv_shape = [config.max_batch, dims.num_kv_heads, capacity, dims.head_dim]
    itemsize = 2  # fp16 and bf16
    entries: dict[str, Any] = {
        "device": "cuda",
        "kv_cache": {
            "layout": "slots",
            "format": "BNSH",
            "dtype": dtype,
            "shape_per_layer": kv_shape,
            "capacity": capacity,
            # positions [max_seq_len, capacity) are scratch for idle and padded rows
            "scratch_tokens": capacity - config.max_seq_len,
            "num_kv_heads": dims.num_kv_heads,
            "bytes_per_token": 2 * dims.num_layers * dims.num_kv_heads * dims.head_dim * itemsize,
            "total_bytes": 2
            * dims.num_layers
            * kv_shape[0]
            * kv_shape[1]
            * capacity
            * kv_shape[3]
            * itemsize,
        },
        "dtypes": {"weights": dtype, "activations": dtype, "logits": "float32"},
        "attention_ops": lowering.get("ops"),
        "max_step_tokens": max_step_tokens(config.max_seq_len, config.max_num_tokens),
    }
    if config.backend == "tensorrt":
        entries["tensorrt"] = trt_entry
        entries["backend_versions"] = (
            {trt_entry["module"]: trt_entry["version"]} if trt_entry.get("version") else {}
        )
    else:
        entries["backend_versions"] = ort_backend.runtime_versions()
    return entries
