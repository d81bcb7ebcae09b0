"""One flat, ordered pass list per backend, run with timing, reports and IR checks between passes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from enginesmith.compiler.backends.tensorrt import (
    attention_ops,
    gpu_dtype,
    kv_cache_capacity,
)
from enginesmith.compiler.config import BuildConfig
from enginesmith.compiler.export import ModelDims
from enginesmith.compiler.sources import LoadedModel
from enginesmith.passes.base import EnginePass
from enginesmith.passes.canonicalize import CanonicalizePass
from enginesmith.passes.cleanup import CleanupPass
from enginesmith.passes.fuse_attention import FuseAttentionPass
from enginesmith.passes.fuse_rmsnorm import FuseRMSNormPass
from enginesmith.passes.fuse_rotary import FuseRotaryIntoAttentionPass
from enginesmith.passes.pack_gate_up import PackGateUpPass
from enginesmith.passes.pack_qkv import PackQKVPass
from enginesmith.passes.quantize_weights import QuantizeWeightsPass
from enginesmith.passes.remove_layout_noops import RemoveLayoutNoOpsPass
from enginesmith.plugins.flash_attention.onnxruntime import LowerFlashAttentionToORT
from enginesmith.runtime.errors import BuildError


@dataclass
class PassInputs:
    """What optional passes need beyond the graph, prepared by the build before the pipeline
    runs (e.g. calibration statistics from the reference model)."""

    config: BuildConfig | None = None
    loaded: LoadedModel | None = None
    extra: dict[str, Any] = field(default_factory=dict)


DEFAULT_MAX_POSITIONS = 2048  # rotary tables when no BuildConfig gives max_seq_len (tests)


def onnxruntime_passes(dims: ModelDims, inputs: PassInputs | None = None) -> list[EnginePass]:
    config = inputs.config if inputs else None
    passes: list[EnginePass] = [
        # Older opsets / decomposed RMSNorm and rotary -> the opset-23 ops the fusions match.
        CanonicalizePass(),
        # Attention next: it needs the exporter's Concat/Expand cache chain intact.
        FuseAttentionPass(dims.num_heads, dims.num_kv_heads, dims.head_dim, dims.sliding_window),
        # The causal-mask and Concat chains are now dead; fold and collapse what is left.
        CleanupPass(),
    ]
    if config is not None and config.kv_heads is not None:
        # [kv-collapse] On the backend-neutral plugin op, before lowering (and before packing:
        # it rewrites the K/V projection weights).
        passes.append(_collapse_kv_heads(dims, config, inputs))
    max_positions = config.max_seq_len if config is not None else DEFAULT_MAX_POSITIONS
    passes += [
        # Decode-speed fusions on the plugin op: rotary into it, then the exporter's Reshape
        # chains around it are no-ops, then one packed QKV projection per layer.
        FuseRotaryIntoAttentionPass(dims.head_dim, max_positions),
        CleanupPass(),  # cancels the Transpose pairs the rotary left
        RemoveLayoutNoOpsPass(),
        CleanupPass(),
        PackQKVPass(),
        PackGateUpPass(),
        # Backend lowering after every backend-neutral pass: they all see the plugin op.
        LowerFlashAttentionToORT(),
        FuseRMSNormPass(),
        CleanupPass(),
    ]
    if config is not None and config.quantize is not None:
        # [quantize] Backend-specific weight format (MatMulNBits), after lowering.
        # accuracy_level 4: int8 activations inside MatMulNBits, the fast CPU kernels.
        # The embedding table / LM head stays at 8 bits in int4 mode, as llama.cpp keeps its
        # output matrix at 8 bits in Q4 files (SmolLM2 perplexity 18.7 instead of 20.5), in
        # blocks of >= 128: the largest MatMul of a decode step runs ~1/3 faster than with 32
        # for the same perplexity (docs/benchmarks.md).
        passes.append(
            QuantizeWeightsPass(
                bits=8 if config.quantize == "int8" else 4,
                block_size=config.block_size,
                symmetric=config.quant_scheme == "symmetric",
                accuracy_level=4,
                embedding_bits=8,
                embedding_block_size=max(config.block_size, 128),
                keep_grid=config.quant_method == "auto",
            )
        )
    return passes


def _collapse_kv_heads(
    dims: ModelDims, config: BuildConfig, inputs: PassInputs | None
) -> EnginePass:
    """The KV-head collapse pass, with calibration statistics from the reference model (for
    --kv-grouping similarity and the reconstruction-error report)."""
    from enginesmith.compiler import kv_calibration
    from enginesmith.passes.base import PassError
    from enginesmith.passes.collapse_kv_heads import CollapseKVHeadsPass, check_target

    assert config.kv_heads is not None
    try:
        check_target(config.kv_heads, dims.num_heads, dims.num_kv_heads)
    except PassError as exc:
        raise BuildError(str(exc)) from exc
    loaded = inputs.loaded if inputs else None
    stats = None
    if config.kv_heads < dims.num_kv_heads and loaded is not None:
        stats = kv_calibration.collect_head_stats(
            loaded.model, loaded.tokenizer, config.calibration
        )
    elif config.kv_grouping == "similarity" and config.kv_heads < dims.num_kv_heads:
        raise BuildError("--kv-grouping similarity needs the reference model [developer error]")
    # Already collapsed (with recovery, before the export: compiler/kv_recovery.py): a no-op.
    grouping = config.kv_grouping if config.kv_heads < dims.num_kv_heads else "contiguous"
    return CollapseKVHeadsPass(config.kv_heads, grouping, stats, expected_layers=dims.num_layers)


def tensorrt_passes(dims: ModelDims, inputs: PassInputs | None = None) -> list[EnginePass]:
    from enginesmith.passes.convert_float import ConvertFloatPass
    from enginesmith.plugins.flash_attention.tensorrt import LowerFlashAttentionToTensorRT

    config = inputs.config if inputs else None
    max_seq_len = config.max_seq_len if config is not None else 2048
    max_num_tokens = config.max_num_tokens if config is not None else 512
    passes: list[EnginePass] = [
        # Attention first: it needs the exporter's Concat/Expand cache chain intact.
        FuseAttentionPass(dims.num_heads, dims.num_kv_heads, dims.head_dim, dims.sliding_window),
        # The causal-mask and Concat chains are now dead; fold and collapse what is left.
        CleanupPass(),
    ]
    if config is not None and config.kv_heads is not None:
        # [kv-collapse] On the backend-neutral plugin op, before lowering.
        passes.append(_collapse_kv_heads(dims, config, inputs))
    passes += [
        # Backend lowering after every backend-neutral pass; the cache gets its static capacity.
        LowerFlashAttentionToTensorRT(
            attention_ops(config, dims.sliding_window),
            kv_cache_capacity(max_seq_len, max_num_tokens),
        ),
        # Last: every float tensor the passes above created is converted with the weights.
        ConvertFloatPass(gpu_dtype(config)),
    ]
    return passes


# The GPU backends share one TensorRT-ready graph (compiler/backends/tensorrt.py).
PIPELINES = {
    "onnxruntime": onnxruntime_passes,
    "onnxruntime-gpu": tensorrt_passes,
    "tensorrt": tensorrt_passes,
}


@dataclass
class PassRecord:
    name: str
    seconds: float
    modified: bool
    nodes_after: int
    report: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seconds": round(self.seconds, 4),
            "modified": self.modified,
            "nodes_after": self.nodes_after,
            **self.report,
        }


def check_ir(model: ir.Model) -> None:
    """Cheap structural check: every node input is defined before use (graph inputs,
    initializers or an earlier node), and graph outputs are defined."""
    graph = model.graph
    defined = {id(v) for v in graph.inputs} | {id(v) for v in graph.initializers.values()}
    for node in graph:
        for value in node.inputs:
            if value is not None and id(value) not in defined:
                raise ValueError(
                    f"node {node.name} ({node.op_type}) uses {value.name} before it is defined"
                )
        defined.update(id(v) for v in node.outputs)
    for value in graph.outputs:
        if id(value) not in defined:
            raise ValueError(f"graph output {value.name} is not produced")


def run_pipeline(model: ir.Model, passes: list[EnginePass], log: Any = None) -> list[PassRecord]:
    """Run PASSES in order on MODEL (in place); return one record per pass."""
    records: list[PassRecord] = []
    for p in passes:
        start = time.perf_counter()
        try:
            result = p(model)
            check_ir(result.model)
        except Exception as exc:
            done = ", ".join(r.name for r in records) or "none"
            raise BuildError(
                f"pass {p.name} failed ({type(exc).__name__}: {exc}); passes before it: {done}"
            ) from exc
        record = PassRecord(
            p.name, time.perf_counter() - start, result.modified, model.graph.num_nodes(), p.report
        )
        records.append(record)
        if log:
            log(record)
    return records
