"""Pick the executor for an engine directory's backend: the one place that decides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from enginesmith.runtime.errors import BackendUnavailableError
from enginesmith.runtime.executor import Executor, SpinMode

EXECUTOR_BACKENDS = ("onnxruntime", "onnxruntime-gpu", "tensorrt")


def open_executor(
    engine_dir: Path,
    manifest: dict[str, Any],
    threads: int | None = None,
    spin: SpinMode = "always",
) -> Executor:
    """The executor for MANIFEST's backend: ONNX Runtime on CPU or CUDA, or TensorRT. Each is
    imported only when chosen (the GPU ones need libraries a CPU machine lacks). SPIN
    (executor.SpinMode) concerns ONNX Runtime on CPU only."""
    backend = manifest.get("backend")
    if backend == "onnxruntime":
        from enginesmith.runtime.ort_cpu_executor import OrtCpuExecutor

        return OrtCpuExecutor(engine_dir, manifest, threads=threads, spin=spin)
    if backend == "onnxruntime-gpu":
        from enginesmith.runtime.ort_cuda_executor import OrtCudaExecutor

        return OrtCudaExecutor(engine_dir, manifest)
    if backend == "tensorrt":
        from enginesmith.runtime.trt_executor import TensorRTExecutor

        return TensorRTExecutor(engine_dir, manifest)
    raise BackendUnavailableError(
        f"{engine_dir}: backend {backend!r} is not supported by this runtime; rebuild with "
        f"--backend one of {', '.join(EXECUTOR_BACKENDS)}"
    )
