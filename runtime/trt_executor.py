"""TensorRT engine session: the OrtCpuExecutor interface (`step`, `warmup`) over a model.plan.

Device memory is allocated once: one KV buffer per layer and kind, [max_batch, kv_heads,
capacity, head_dim] fp16/bf16, plus input and logits buffers sized for the largest step. A step
over slots [start, start + n) binds past_key.i AND present_key.i to the address of row `start`
of the buffer (rows are contiguous), so the KV-update layers write in place and no step copies
the cache. Idle rows (query_seqlens = 0) write into the scratch tail of their row (positions
[capacity - S, capacity)), never into cached tokens (plugins/flash_attention/tensorrt.py).

One execution context per optimization profile (0: decode, S = 1; 1: prefill, S > 1). Decode
steps can replay a captured CUDA graph (cuda_graphs=True): every decode step then runs all
max_batch rows (the ones outside the call are idle), so one fixed-shape graph serves them all.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from enginesmith.runtime.errors import BackendUnavailableError, EngineDirError
from enginesmith.runtime.executor import (
    check_slot_range,
    step_arrays,
    step_in_chunks,
    warmup_idle_steps,
)

_DECODE, _PREFILL = 0, 1


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def engine_incompatibility(
    entry: dict[str, Any], runtime_family: str, runtime_version: str, device_cc: tuple[int, int]
) -> str | None:
    """Why a plan described by the manifest's "tensorrt" ENTRY cannot run with this TensorRT
    (family "tensorrt" | "tensorrt_rtx", version) on a GPU of compute capability DEVICE_CC;
    None when it can. Each reason names the install or the rebuild that fixes it."""
    built_family, built_version = entry.get("module"), str(entry.get("version", "?"))
    pretty = {"tensorrt": "TensorRT", "tensorrt_rtx": "TensorRT-RTX"}
    rebuild = "or rebuild the engine here with build-engine MODEL -o DIR --backend tensorrt --force"
    if built_family != runtime_family:
        return (
            f"the plan was built by {pretty.get(str(built_family), built_family)} "
            f"{built_version} but {pretty.get(runtime_family, runtime_family)} "
            f"{runtime_version} is installed: install the builder's library, {rebuild}"
        )
    built, have = _version_tuple(built_version), _version_tuple(runtime_version)
    if entry.get("version_compatible"):
        ok = have[:1] == built[:1] and have >= built
    else:
        ok = have == built
    if not ok:
        wanted = (
            "the same major version, same or newer"
            if entry.get("version_compatible")
            else "exactly that version"
        )
        return (
            f"the plan was built by {pretty[runtime_family]} {built_version} and needs "
            f"{wanted}, but {runtime_version} is installed: install {built_version}, {rebuild}"
        )
    cc = f"{device_cc[0]}.{device_cc[1]}"
    targets = [str(t) for t in entry.get("compute_capabilities", [])]
    level = entry.get("hardware_compatibility", "none")
    fits = device_cc[0] >= 8 if level == "ampere-plus" else cc in targets
    if not fits:
        return (
            f"the plan was built for compute capability {', '.join(targets) or '?'} "
            f"(hardware compatibility {level}) and this GPU is {cc}: {rebuild.replace('or ', '', 1)}"
            " on this GPU (or build with --trt-hardware-compat ampere-plus)"
        )
    return None


class TensorRTExecutor:
    """Runs steps of a TensorRT engine directory over its in-place, slot-based KV cache."""

    def __init__(
        self, engine_dir: Path, manifest: dict[str, Any], cuda_graphs: bool | None = None
    ) -> None:
        from enginesmith.runtime import cuda
        from enginesmith.runtime.tensorrt_lib import INSTALL_HINT, find_tensorrt

        entry = manifest.get("tensorrt") or {}
        if not entry.get("plan"):
            raise EngineDirError(
                f"{engine_dir}: built with --onnx-only, so it has no model.plan: build the plan "
                "on the target with build-engine MODEL -o DIR --backend tensorrt"
            )
        try:
            found = find_tensorrt()
        except BackendUnavailableError as exc:
            raise BackendUnavailableError(
                f"{engine_dir} is a TensorRT engine and TensorRT is not installed: {INSTALL_HINT}"
            ) from exc
        cuda.require_gpu("running a TensorRT engine")
        why = engine_incompatibility(entry, found.name, found.version, cuda.compute_capability())
        if why:
            raise EngineDirError(f"{engine_dir}: {why}")
        trt = found.module
        self.trt = trt
        self._logger = trt.Logger(trt.Logger.ERROR)
        self.runtime = trt.Runtime(self._logger)
        self.engine = self.runtime.deserialize_cuda_engine(
            (engine_dir / entry["plan"]).read_bytes()
        )
        if self.engine is None:
            raise EngineDirError(
                f"{engine_dir}: TensorRT {found.version} could not load model.plan (built for "
                "another GPU or TensorRT version?): rebuild the engine on this machine"
            )
        model, kv = manifest["model"], manifest["kv_cache"]
        self.num_layers: int = model["num_layers"]
        self.vocab_size: int = model["vocab_size"]
        self.max_batch: int = manifest["max_batch"]
        self.max_seq_len: int = manifest["max_seq_len"]
        self.max_step_tokens: int = manifest["max_step_tokens"]
        self.capacity: int = kv["capacity"]
        self.kv_heads, self.head_dim = kv["num_kv_heads"], model["head_dim"]
        self.max_logits = max(self.max_batch, self.max_step_tokens)
        itemsize = 2  # fp16 / bf16
        self.slot_bytes = self.kv_heads * self.capacity * self.head_dim * itemsize
        self.stream = cuda.Stream()
        # [max_batch, kv_heads, capacity, head_dim] per layer and kind; zeroed once so that
        # positions no row ever wrote hold finite values (masked weights are 0, 0 * NaN is not).
        self.cache_key = [
            cuda.DeviceBuffer(self.max_batch * self.slot_bytes) for _ in range(self.num_layers)
        ]
        self.cache_value = [
            cuda.DeviceBuffer(self.max_batch * self.slot_bytes) for _ in range(self.num_layers)
        ]
        for buffer in (*self.cache_key, *self.cache_value):
            buffer.zero()
        tokens = self.max_batch * self.max_step_tokens
        self._inputs = {
            "input_ids": cuda.DeviceBuffer(tokens * 8),
            "position_ids": cuda.DeviceBuffer(tokens * 8),
            "logits_indices": cuda.DeviceBuffer(self.max_logits * 8),
            "seqlens_k": cuda.DeviceBuffer(self.max_batch * 4),
            "query_seqlens": cuda.DeviceBuffer(self.max_batch * 4),
        }
        self._logits = cuda.DeviceBuffer(self.max_logits * self.vocab_size * 4)
        self.contexts = []
        for profile in range(self.engine.num_optimization_profiles):
            context = self.engine.create_execution_context()
            context.set_optimization_profile_async(profile, self.stream.ptr)
            self.contexts.append(context)
        if cuda_graphs is None:
            cuda_graphs = os.environ.get("ENGINESMITH_CUDA_GRAPHS", "0") == "1"
        self.cuda_graphs = cuda_graphs
        self._decode_graph: Any = None
        self.stream.synchronize()

    def warmup(self) -> None:
        """Idle steps of each profile: first runs allocate and (TensorRT-RTX) JIT-compile."""
        warmup_idle_steps(self.step, self.max_step_tokens)

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
        m = len(logits_indices)
        check_slot_range(start, rows, self.max_batch)
        if seq > self.max_step_tokens:  # wider than the profile: consecutive narrower steps
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
        if m > self.max_logits:
            raise ValueError(
                f"{m} logit rows exceed the engine's profile ({self.max_logits}) [developer error]"
            )
        if seq == 1 and self.cuda_graphs:
            return self._decode_all_slots(
                start, input_ids, position_ids, seqlens_k, query_seqlens, logits_indices
            )
        context = self.contexts[_DECODE if seq == 1 else _PREFILL]
        self._upload(input_ids, position_ids, seqlens_k, query_seqlens, logits_indices)
        self._bind(context, start, rows, seq, m)
        if not context.execute_async_v3(self.stream.ptr):
            raise RuntimeError("TensorRT execute_async_v3 failed [developer error]")
        return self._download(m)

    # -- internals --------------------------------------------------------------------------

    def _upload(self, *arrays: np.ndarray) -> None:
        for name, array in step_arrays(*arrays).items():
            self._inputs[name].upload(array, self.stream)

    def _bind(self, context: Any, start: int, rows: int, seq: int, m: int) -> None:
        shapes = {
            "input_ids": (rows, seq),
            "position_ids": (rows, seq),
            "logits_indices": (m,),
            "seqlens_k": (rows,),
            "query_seqlens": (rows,),
        }
        for name, shape in shapes.items():
            context.set_input_shape(name, shape)
            context.set_tensor_address(name, self._inputs[name].ptr)
        cache_shape = (rows, self.kv_heads, self.capacity, self.head_dim)
        offset = start * self.slot_bytes
        for layer in range(self.num_layers):
            for kind, buffers in (("key", self.cache_key), ("value", self.cache_value)):
                address = buffers[layer].ptr + offset
                context.set_input_shape(f"past_{kind}.{layer}", cache_shape)
                context.set_tensor_address(f"past_{kind}.{layer}", address)
                context.set_tensor_address(f"present_{kind}.{layer}", address)  # in place
        context.set_tensor_address("logits", self._logits.ptr)

    def _download(self, m: int) -> np.ndarray:
        logits = np.empty((m, self.vocab_size), np.float32)
        self._logits.download(logits, self.stream)
        self.stream.synchronize()
        return logits

    def _decode_all_slots(
        self,
        start: int,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        seqlens_k: np.ndarray,
        query_seqlens: np.ndarray,
        logits_indices: np.ndarray,
    ) -> np.ndarray:
        """A decode step widened to all slots (others idle), replayed from one CUDA graph."""
        from enginesmith.runtime import cuda

        rows, full = input_ids.shape[0], self.max_batch
        ids, pos = np.zeros((full, 1), np.int64), np.zeros((full, 1), np.int64)
        seqk, valid = np.zeros(full, np.int32), np.zeros(full, np.int32)
        ids[start : start + rows], pos[start : start + rows] = input_ids, position_ids
        seqk[start : start + rows], valid[start : start + rows] = seqlens_k, query_seqlens
        wanted = np.zeros(full, np.int64)  # fixed logits shape: pad with row 0, drop below
        m = len(logits_indices)
        wanted[:m] = np.asarray(logits_indices, np.int64) + start
        self._upload(ids, pos, seqk, valid, wanted)
        context = self.contexts[_DECODE]
        if self._decode_graph is None:
            self._bind(context, 0, full, 1, full)
            context.execute_async_v3(self.stream.ptr)  # lazy allocations happen outside capture
            self.stream.synchronize()
            self._decode_graph = cuda.CudaGraph(
                self.stream, lambda: context.execute_async_v3(self.stream.ptr)
            )
        self._decode_graph.launch()
        return self._download(full)[:m]
