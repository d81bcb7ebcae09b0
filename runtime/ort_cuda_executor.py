"""ONNX Runtime CUDA engine session (--backend onnxruntime-gpu): the OrtCpuExecutor interface over
the TensorRT-ready graph's standard-op form (TensorScatter + Attention), run by the CUDA
execution provider.

The KV cache lives on the GPU: one OrtValue per layer and kind, [max_batch, kv_heads, capacity,
head_dim], zeroed once. A numpy slice cannot describe device memory, so a step over slots
[start, start + n) binds past_key.i and present_key.i with IOBinding's raw-pointer form (the
buffer's address plus start rows): the same in-place, zero-copy slot ranges as the CPU session.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from enginesmith.runtime.errors import BackendUnavailableError
from enginesmith.runtime.executor import (
    bind_step_inputs,
    check_slot_range,
    step_in_chunks,
    warmup_idle_steps,
)

_ORT_TYPES = {"float16": np.float16}  # numpy has no bfloat16: bind those by ONNX type number
_ONNX_BFLOAT16 = 16


def _cuda_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - dependency of the package
        raise BackendUnavailableError("onnxruntime is not installed: run scripts/setup") from exc
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise BackendUnavailableError(
            "this engine runs on ONNX Runtime's CUDA provider, which the installed onnxruntime "
            f"{onnxruntime.__version__} lacks: pip uninstall onnxruntime && pip install "
            "onnxruntime-gpu (they share one import name), with CUDA 13 and cuDNN 9"
        )
    return onnxruntime


class OrtCudaExecutor:
    """Runs steps of an onnxruntime-gpu engine directory over its device-side KV slots."""

    def __init__(self, engine_dir: Path, manifest: dict[str, Any], device_id: int = 0) -> None:
        from enginesmith.runtime import cuda

        ort = _cuda_ort()
        cuda.require_gpu("running an onnxruntime-gpu engine")
        model, kv = manifest["model"], manifest["kv_cache"]
        self.num_layers: int = model["num_layers"]
        self.vocab_size: int = model["vocab_size"]
        self.max_batch: int = manifest["max_batch"]
        self.max_seq_len: int = manifest["max_seq_len"]
        self.max_step_tokens: int = manifest["max_step_tokens"]
        self.capacity: int = kv["capacity"]
        self.kv_heads, self.head_dim = kv["num_kv_heads"], model["head_dim"]
        self.device_id = device_id
        self.kv_type: Any = _ORT_TYPES.get(kv["dtype"], _ONNX_BFLOAT16)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.enable_mem_pattern = False  # shapes change every step
        self.session = ort.InferenceSession(
            str(engine_dir / manifest["files_by_role"]["model"]),
            options,
            providers=[("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"],
        )
        shape = (self.max_batch, self.kv_heads, self.capacity, self.head_dim)
        host = np.zeros(shape, np.float16)  # zeros: same bytes in fp16 and bf16
        # Zeroed once: positions no row ever wrote must hold finite values (masked attention
        # weights are 0, and 0 * NaN is NaN).
        self.cache_key = [
            ort.OrtValue.ortvalue_from_numpy(host, "cuda", device_id)
            for _ in range(self.num_layers)
        ]
        self.cache_value = [
            ort.OrtValue.ortvalue_from_numpy(host, "cuda", device_id)
            for _ in range(self.num_layers)
        ]
        self.slot_bytes = self.kv_heads * self.capacity * self.head_dim * 2
        self._bindings: dict[tuple[int, int], Any] = {}

    def warmup(self) -> None:
        warmup_idle_steps(self.step, self.max_step_tokens)

    def _binding(self, start: int, rows: int) -> Any:
        """An IOBinding for slots [start, start + rows) with every layer's cache bound in place
        (past and present to the same device rows), memoized per slot range: a step then only
        rebinds its few small inputs."""
        key = (start, rows)
        if key not in self._bindings:
            binding = self.session.io_binding()
            binding.bind_output("logits", "cpu")  # first bound output: get_outputs()[0]
            shape = [rows, self.kv_heads, self.capacity, self.head_dim]
            offset = start * self.slot_bytes
            for layer in range(self.num_layers):
                for kind, buffers in (("key", self.cache_key), ("value", self.cache_value)):
                    address = buffers[layer].data_ptr() + offset
                    args = ("cuda", self.device_id, self.kv_type, shape, address)
                    binding.bind_input(f"past_{kind}.{layer}", *args)
                    binding.bind_output(f"present_{kind}.{layer}", *args)  # same rows: in place
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
        """Run slots [start, start + n); return logits [m, vocab] (float32)."""
        rows, seq = input_ids.shape
        check_slot_range(start, rows, self.max_batch)
        if seq > self.max_step_tokens:  # wider than the scratch tail: narrower steps
            return step_in_chunks(
                self.step,
                self.max_step_tokens,
                start,
                input_ids,
                position_ids,
                seqlens_k,
                query_seqlens,
                logits_indices,
            )
        binding = self._binding(start, rows)
        bind_step_inputs(binding, input_ids, position_ids, seqlens_k, query_seqlens, logits_indices)
        binding.bind_output("logits", "cpu")  # rebound (same index): a fresh array each run
        self.session.run_with_iobinding(binding)
        return np.asarray(binding.get_outputs()[0].numpy(), np.float32)
