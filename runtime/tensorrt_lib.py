"""Finding the installed TensorRT (full TensorRT or TensorRT for RTX): shared by the runtime's
TensorRT executor and the compiler's TensorRT backend."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from enginesmith.runtime.errors import BackendUnavailableError

INSTALL_HINT = (
    "install TensorRT for RTX from PyPI (pip install tensorrt-rtx-cu13, or -cu12 for CUDA 12) "
    "or NVIDIA's full TensorRT (pip install tensorrt-cu13 --extra-index-url "
    "https://pypi.nvidia.com)"
)
_TRT_MODULES = ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings")


@dataclass(frozen=True)
class TensorRT:
    """The importable TensorRT flavour: `module` is the Python module, `name` its family."""

    module: Any
    name: str  # "tensorrt" or "tensorrt_rtx"
    version: str

    @property
    def rtx(self) -> bool:
        return self.name == "tensorrt_rtx"


def find_tensorrt(names: tuple[str, ...] = _TRT_MODULES) -> TensorRT:
    """Import TensorRT (full, then TensorRT-RTX); one-line error naming the install if none."""
    failures = []
    for name in names:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            failures.append(f"{name}: {exc}")
            continue
        family = "tensorrt" if name == "tensorrt" else "tensorrt_rtx"
        return TensorRT(module, family, str(getattr(module, "__version__", "unknown")))
    raise BackendUnavailableError(
        f"the tensorrt backend needs TensorRT, which is not installed: {INSTALL_HINT}; or pass "
        "--onnx-only to write only the TensorRT-ready ONNX graph"
    )
