"""ONNX Runtime CPU executor: one preallocated KV buffer per layer, bound in place.

The cache of layer i is one array [max_batch, kv_heads, max_seq_len, head_dim]. A step runs a
contiguous range of slots [start, stop): the rows of that range are a contiguous prefix-free
slice of every buffer, so past_key.i and present_key.i are bound to the *same* zero-copy
OrtValue and GroupQueryAttention writes new tokens in place. No step copies the cache.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from enginesmith.plugins.flash_attention import kv_quant
from enginesmith.runtime.errors import BackendUnavailableError
from enginesmith.runtime.executor import (
    SpinMode,
    bind_step_inputs,
    check_slot_range,
    warmup_idle_steps,
)


def resident_zeros(shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
    """Zeros whose every page is already backed by memory. np.zeros maps pages lazily, so
    the cache's first writes would fault them in during serving steps; on this kind of VM a
    first touch runs at ~0.5 GB/s instead of ~20. Paying that at load keeps it out of request
    latency."""
    out = np.empty(shape, dtype)
    out.fill(0)
    return out


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - dependency of the package
        raise BackendUnavailableError("onnxruntime is not installed: run scripts/setup") from exc
    return onnxruntime


class OrtCpuExecutor:
    """Runs steps of an onnxruntime engine directory over its slot-based KV cache (an
    `Executor`)."""

    def __init__(
        self,
        engine_dir: Path,
        manifest: dict[str, Any],
        threads: int | None = None,
        spin: SpinMode = "always",
    ) -> None:
        ort = _ort()
        model = manifest["model"]
        self.num_layers: int = model["num_layers"]
        self.max_batch: int = manifest["max_batch"]
        self.max_seq_len: int = manifest["max_seq_len"]
        self.vocab_size: int = model["vocab_size"]
        threads = threads or int(os.environ.get("ENGINESMITH_THREADS", "0"))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        # Shapes change every step (prompt lengths, batch rows): a memory pattern planned per
        # shape costs ~0.4 s on each new prefill length and is never reused.
        options.enable_mem_pattern = False
        if spin == "in_run":
            # Two sessions taking turns: workers still spinning after one session's run would
            # slow the other's run down, and a pool that never spins wakes its workers for every
            # kernel (docs/speculative.md has the bench-spec figures).
            options.add_session_config_entry("session.force_spinning_stop", "1")
        if spin == "never":
            # Spinning ORT workers starve other Python threads (an asyncio server's): measured
            # in-flight serving 102 -> 262 tok/s without it under load, single-stream decode -20%.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(engine_dir / manifest["files_by_role"]["model"]),
            options,
            providers=["CPUExecutionProvider"],
        )
        # float32, or a quantized cache (kv_quant.py: int8, or int4 packed two per uint8 byte);
        # its scales are initializers of the graph.
        self.kv_cache_dtype: str = manifest["kv_cache"].get("dtype", "float32")
        last_dim = kv_quant.cache_last_dim(self.kv_cache_dtype, model["head_dim"])
        kv_shape = (self.max_batch, model["num_kv_heads"], self.max_seq_len, last_dim)
        # [layers, max_batch, kv_heads, max_seq_len, head_dim] per kind, allocated once; layer i
        # is the contiguous view cache_key[i] that ONNX Runtime binds.
        element = kv_quant.cache_numpy_dtype(self.kv_cache_dtype)
        self.cache_key_all = resident_zeros((self.num_layers, *kv_shape), element)
        self.cache_value_all = resident_zeros((self.num_layers, *kv_shape), element)
        self.cache_key = list(self.cache_key_all)
        self.cache_value = list(self.cache_value_all)
        self._bindings: dict[tuple[int, int], Any] = {}

    def warmup(self) -> None:
        """Idle steps of each shape (first runs allocate and pick kernels)."""
        warmup_idle_steps(self.step, self.max_seq_len)

    def _binding(self, start: int, stop: int) -> Any:
        """An IOBinding for slots [start, stop) with every layer's cache bound in place (past and
        present to the same zero-copy view), memoized: a step then only rebinds its few small
        inputs instead of 2 * num_layers cache views."""
        key = (start, stop)
        if key not in self._bindings:
            ort = _ort()
            binding = self.session.io_binding()
            binding.bind_output("logits", "cpu")  # first bound output: get_outputs()[0]
            for i in range(self.num_layers):
                for kind, buffers in (("key", self.cache_key), ("value", self.cache_value)):
                    value = ort.OrtValue.ortvalue_from_numpy(buffers[i][start:stop])
                    binding.bind_ortvalue_input(f"past_{kind}.{i}", value)
                    binding.bind_ortvalue_output(f"present_{kind}.{i}", value)  # in place
            self._bindings[key] = binding
        return self._bindings[key]

    def step(
        self,
        start: int,
        input_ids: np.ndarray,  # [n, S] int64, right-padded
        position_ids: np.ndarray,  # [n, S] int64
        seqlens_k: np.ndarray,  # [n] int32: tokens in the slot after this step - 1
        query_seqlens: np.ndarray,  # [n] int32: valid new tokens per row (0 = idle)
        logits_indices: np.ndarray,  # [m] int64: flat row * S + s positions that need logits
    ) -> np.ndarray:
        """Run slots [start, start + n); return logits [m, vocab]."""
        rows = input_ids.shape[0]
        check_slot_range(start, rows, self.max_batch)
        binding = self._binding(start, start + rows)
        bind_step_inputs(binding, input_ids, position_ids, seqlens_k, query_seqlens, logits_indices)
        binding.bind_output("logits", "cpu")  # rebound (same index): a fresh array each run
        self.session.run_with_iobinding(binding)
        # The raw vector: get_outputs() would wrap all 2 * num_layers + 1 outputs in Python
        # OrtValues each step (measured ~0.2 ms of host time per token), for the logits alone.
        return binding.get_outputs_as_ortvaluevector()[0].numpy()
