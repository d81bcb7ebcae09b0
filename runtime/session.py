"""ONNX Runtime engine session: one preallocated KV buffer per layer, bound in place.

The cache of layer i is one array [max_batch, kv_heads, max_seq_len, head_dim]. A step runs a
contiguous range of slots [start, stop): the rows of that range are a contiguous prefix-free
slice of every buffer, so past_key.i and present_key.i are bound to the *same* zero-copy
OrtValue and GroupQueryAttention writes new tokens in place. No step copies the cache.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from enginesmith.compiler.errors import BackendUnavailableError
from enginesmith.runtime.decode_plan import CompiledDecoder, DecodePlan, DecodePlanUnsupported
from enginesmith.runtime.huge_pages import huge_page_empty
from enginesmith.runtime.sessions import bind_step_inputs, check_slot_range, warmup_idle_steps

# Decode steps with more rows run on ONNX Runtime: its GEMM reuses each weight tile for many
# rows, the compiled kernels' 4x4 tiles only four times. At 4 rows the kernels measure level
# with it or ahead (scripts/compare_decode_kernels.py --rows 1,4, docs/benchmarks.md); wider
# is unmeasured.
DECODE_KERNEL_MAX_ROWS = 4


def resident_zeros(shape: tuple[int, ...]) -> np.ndarray:
    """fp32 zeros whose every page is already backed by memory. np.zeros maps pages lazily, so
    the cache's first writes fault them in during serving steps: on this VM a first touch
    often runs at ~0.5 GB/s instead of ~20 (the host backs the page then; scripts/first_touch.py
    measures it), and those faults had landed in the first in-flight steps
    (docs/benchmarks.md). Paying that at load keeps it out of request latency. On huge pages
    (runtime/huge_pages.py): the decode attention reads runs of keys and values all over them."""
    out = huge_page_empty(shape, np.float32)
    out.fill(0.0)
    return out


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - dependency of the package
        raise BackendUnavailableError("onnxruntime is not installed: run scripts/setup") from exc
    return onnxruntime


class EngineSession:
    """Runs steps of an onnxruntime engine directory over its slot-based KV cache."""

    def __init__(
        self,
        engine_dir: Path,
        manifest: dict[str, Any],
        threads: int | None = None,
        spin_wait: bool = True,
        decode_kernels: bool | None = None,
    ) -> None:
        """DECODE_KERNELS: run decode steps (one new token per row, at most
        DECODE_KERNEL_MAX_ROWS rows) on the compiled CPU kernels of runtime/decode_kernels.py
        when the engine's graph is one they implement (fp32 weights). None = the
        ENGINESMITH_DECODE_KERNELS environment variable ("0" turns them off; on otherwise):
        `enginesmith bench` and `bench --serving` measure them ahead of ONNX Runtime's steps
        for single-stream decode, sequential serving and static batching and level for
        in-flight serving (docs/benchmarks.md). Other steps, and engines the kernels do not
        implement, run on ONNX Runtime over the same caches."""
        ort = _ort()
        model = manifest["model"]
        self.num_layers: int = model["num_layers"]
        self.max_batch: int = manifest["max_batch"]
        self.max_seq_len: int = manifest["max_seq_len"]
        self.vocab_size: int = model["vocab_size"]
        threads = threads or int(os.environ.get("ENGINESMITH_THREADS", "0"))
        self.decoder: CompiledDecoder | None = None
        self.decoder_unavailable = "off (decode_kernels=False or ENGINESMITH_DECODE_KERNELS=0)"
        if decode_kernels is None:
            decode_kernels = os.environ.get("ENGINESMITH_DECODE_KERNELS", "1") != "0"
        if decode_kernels:
            try:
                plan = DecodePlan.from_engine(engine_dir / manifest["files_by_role"]["model"])
            except DecodePlanUnsupported as exc:
                self.decoder_unavailable = str(exc)
            else:
                self.decoder = CompiledDecoder(
                    plan, self.max_batch, self.max_seq_len, threads or os.cpu_count() or 1
                )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        # Shapes change every step (prompt lengths, batch rows): a memory pattern planned per
        # shape costs ~0.4 s on each new prefill length and is never reused.
        options.enable_mem_pattern = False
        if not spin_wait:
            # Spinning ORT workers starve other Python threads (an asyncio server's): measured
            # in-flight serving 102 -> 262 tok/s without it under load, single-stream decode -20%.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        elif self.decoder is not None:
            # Workers that spin on after a run take a core from the decode kernels' next steps,
            # which then take ~1.6x as long (scripts/compare_decode_kernels.py, its "right after
            # a prompt step" line): spin within a run, stop at its end.
            options.add_session_config_entry("session.force_spinning_stop", "1")
        self.session = ort.InferenceSession(
            str(engine_dir / manifest["files_by_role"]["model"]),
            options,
            providers=["CPUExecutionProvider"],
        )
        kv_shape = (self.max_batch, model["num_kv_heads"], self.max_seq_len, model["head_dim"])
        # [layers, max_batch, kv_heads, max_seq_len, head_dim] per kind, allocated once; layer i
        # is the contiguous view cache_key[i] that ONNX Runtime binds.
        self.cache_key_all = resident_zeros((self.num_layers, *kv_shape))
        self.cache_value_all = resident_zeros((self.num_layers, *kv_shape))
        self.cache_key = list(self.cache_key_all)
        self.cache_value = list(self.cache_value_all)
        self._bindings: dict[tuple[int, int], Any] = {}

    def warmup(self) -> None:
        """Idle steps of each shape; the first one also compiles the decode kernels (once per
        machine: numba caches them next to runtime/decode_kernels.py)."""
        if self.decoder is not None and not self.decoder.compiled_on_disk():
            print(
                "compiling the CPU decode kernels (first run only, ~15 s; cached afterwards)",
                file=sys.stderr,
                flush=True,
            )
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

    @property
    def runs_greedy_on_kernels(self) -> bool:
        """Whether greedy_run is available (the decode kernels are on)."""
        return self.decoder is not None

    def greedy_run(
        self, slot: int, token: int, position: int, steps: int, stop_ids: np.ndarray
    ) -> np.ndarray:
        """Up to STEPS greedy decode steps of SLOT in one kernel call, from TOKEN at POSITION,
        ending at a token in STOP_IDS (CompiledDecoder.greedy_run); returns the tokens made."""
        assert self.decoder is not None, "greedy_run needs the decode kernels [developer error]"
        check_slot_range(slot, 1, self.max_batch)
        return self.decoder.greedy_run(
            self.cache_key_all, self.cache_value_all, slot, token, position, steps, stop_ids
        )

    def runs_on_kernels(self, input_ids: np.ndarray) -> bool:
        """Whether a step of these [n, S] input ids runs on the decode kernels: a decode step
        (S = 1) of at most DECODE_KERNEL_MAX_ROWS rows, with the kernels on."""
        rows, width = input_ids.shape
        return self.decoder is not None and width == 1 and rows <= DECODE_KERNEL_MAX_ROWS

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
        if self.runs_on_kernels(input_ids):
            assert self.decoder is not None
            positions = np.where(np.asarray(query_seqlens) > 0, np.asarray(seqlens_k), -1)
            return self.decoder.step(
                self.cache_key_all,
                self.cache_value_all,
                start,
                np.asarray(input_ids)[:, 0],
                positions,
                np.asarray(logits_indices),  # S = 1: flat index = row
            )
        binding = self._binding(start, start + rows)
        bind_step_inputs(binding, input_ids, position_ids, seqlens_k, query_seqlens, logits_indices)
        binding.bind_output("logits", "cpu")  # rebound (same index): a fresh array each run
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()
