"""The few CUDA runtime calls the GPU sessions need, through ctypes (torch here is CPU-only).

The CUDA runtime library is found by polygraphy's loader (CUDA toolkit, LD_LIBRARY_PATH or the
nvidia-cuda-runtime wheel). Device memory is plain cudaMalloc (no managed memory). Every
failure that a user can fix (no library, no GPU, an old driver) is a one-line
BackendUnavailableError.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import numpy as np

from enginesmith.runtime.errors import BackendUnavailableError

_NO_DEVICE = 100  # cudaErrorNoDevice
_INSUFFICIENT_DRIVER = 35  # cudaErrorInsufficientDriver
_ATTR_CC_MAJOR, _ATTR_CC_MINOR = 75, 76  # cudaDevAttrComputeCapabilityMajor / Minor
_MEMCPY_H2D, _MEMCPY_D2H = 1, 2
_CAPTURE_MODE_THREAD_LOCAL = 1


class CudaError(RuntimeError):
    """A CUDA runtime call failed (a bug or a broken device, not a setup problem)."""


@functools.cache
def _library() -> Any:
    try:
        from polygraphy import cuda as poly_cuda

        handle = poly_cuda.wrapper().handle
    except Exception as exc:  # polygraphy raises its own exception type on a missing library
        raise BackendUnavailableError(
            "the CUDA runtime library (libcudart) was not found: install the NVIDIA driver and "
            "CUDA 12/13 runtime (pip install nvidia-cuda-runtime) on a machine with an NVIDIA GPU"
        ) from exc
    if handle is None:  # pragma: no cover - polygraphy raises first
        raise BackendUnavailableError("the CUDA runtime library (libcudart) could not be loaded")
    return handle


def _check(status: int, what: str) -> None:
    if status != 0:
        name = _library().cudaGetErrorName
        name.restype = ctypes.c_char_p
        raise CudaError(f"{what} failed: {name(status).decode()} ({status})")


def device_count() -> int:
    """Number of visible CUDA devices; 0 without a GPU or a usable driver."""
    try:
        lib = _library()
    except BackendUnavailableError:
        return 0
    count = ctypes.c_int(0)
    status = lib.cudaGetDeviceCount(ctypes.byref(count))
    if status in (_NO_DEVICE, _INSUFFICIENT_DRIVER) or status != 0:
        return 0
    return count.value


def require_gpu(what: str) -> None:
    """Raise a one-line BackendUnavailableError unless a CUDA device is visible."""
    if device_count() == 0:
        raise BackendUnavailableError(
            f"{what} needs an NVIDIA GPU and driver, and none is visible here "
            "(nvidia-smi shows none or CUDA_VISIBLE_DEVICES hides it): run it on a GPU machine"
        )


def compute_capability(device: int = 0) -> tuple[int, int]:
    lib = _library()
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    _check(lib.cudaDeviceGetAttribute(ctypes.byref(major), _ATTR_CC_MAJOR, device), "attribute")
    _check(lib.cudaDeviceGetAttribute(ctypes.byref(minor), _ATTR_CC_MINOR, device), "attribute")
    return major.value, minor.value


def device_name(device: int = 0) -> str:
    """The device's marketing name (cudaDeviceGetAttribute has none; read the props struct's
    first field, a 256-byte name, which every CUDA version places first)."""
    buffer = ctypes.create_string_buffer(4096)  # larger than cudaDeviceProp in any release
    lib = _library()
    # CUDA 12+ headers map cudaGetDeviceProperties to the _v2 symbol; older libraries lack it.
    get = getattr(lib, "cudaGetDeviceProperties_v2", None) or lib.cudaGetDeviceProperties
    _check(get(buffer, device), "cudaGetDeviceProperties")
    return buffer.raw[:256].split(b"\0", 1)[0].decode(errors="replace")


class DeviceBuffer:
    """nbytes of device memory from cudaMalloc, freed with the object."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = int(nbytes)
        ptr = ctypes.c_void_p()
        _check(_library().cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(self.nbytes)), "cudaMalloc")
        self.ptr: int = ptr.value or 0

    def zero(self) -> None:
        _check(
            _library().cudaMemset(ctypes.c_void_p(self.ptr), 0, ctypes.c_size_t(self.nbytes)),
            "cudaMemset",
        )

    def upload(self, host: np.ndarray, stream: Stream, offset: int = 0) -> None:
        """Asynchronous host -> device copy of HOST (C-contiguous) at byte OFFSET."""
        host = np.ascontiguousarray(host)
        if offset + host.nbytes > self.nbytes:
            raise ValueError(f"{host.nbytes} bytes do not fit the buffer [developer error]")
        _check(
            _library().cudaMemcpyAsync(
                ctypes.c_void_p(self.ptr + offset),
                host.ctypes.data_as(ctypes.c_void_p),
                ctypes.c_size_t(host.nbytes),
                _MEMCPY_H2D,
                ctypes.c_void_p(stream.ptr),
            ),
            "cudaMemcpyAsync (to device)",
        )

    def download(self, host: np.ndarray, stream: Stream, offset: int = 0) -> np.ndarray:
        """Asynchronous device -> host copy into HOST (synchronize STREAM before reading it)."""
        _check(
            _library().cudaMemcpyAsync(
                host.ctypes.data_as(ctypes.c_void_p),
                ctypes.c_void_p(self.ptr + offset),
                ctypes.c_size_t(host.nbytes),
                _MEMCPY_D2H,
                ctypes.c_void_p(stream.ptr),
            ),
            "cudaMemcpyAsync (to host)",
        )
        return host

    def __del__(self) -> None:
        if getattr(self, "ptr", 0):
            _library().cudaFree(ctypes.c_void_p(self.ptr))
            self.ptr = 0


class Stream:
    """A CUDA stream (cudaStreamCreate)."""

    def __init__(self) -> None:
        ptr = ctypes.c_void_p()
        _check(_library().cudaStreamCreate(ctypes.byref(ptr)), "cudaStreamCreate")
        self.ptr: int = ptr.value or 0

    def synchronize(self) -> None:
        _check(_library().cudaStreamSynchronize(ctypes.c_void_p(self.ptr)), "cudaStreamSynchronize")

    def __del__(self) -> None:
        if getattr(self, "ptr", 0):
            _library().cudaStreamDestroy(ctypes.c_void_p(self.ptr))
            self.ptr = 0


class CudaGraph:
    """A captured sequence of work on a stream, replayed with one launch (cudaGraphLaunch)."""

    def __init__(self, stream: Stream, record: Any) -> None:
        """Capture what RECORD() enqueues on STREAM."""
        lib = _library()
        self.stream = stream
        _check(
            lib.cudaStreamBeginCapture(ctypes.c_void_p(stream.ptr), _CAPTURE_MODE_THREAD_LOCAL),
            "cudaStreamBeginCapture",
        )
        graph = ctypes.c_void_p()
        try:
            record()
        finally:
            _check(
                lib.cudaStreamEndCapture(ctypes.c_void_p(stream.ptr), ctypes.byref(graph)),
                "cudaStreamEndCapture",
            )
        self._graph = graph.value
        exec_ = ctypes.c_void_p()
        _check(
            lib.cudaGraphInstantiate(
                ctypes.byref(exec_), ctypes.c_void_p(self._graph), ctypes.c_ulonglong(0)
            ),
            "cudaGraphInstantiate",
        )
        self._exec = exec_.value

    def launch(self) -> None:
        _check(
            _library().cudaGraphLaunch(
                ctypes.c_void_p(self._exec), ctypes.c_void_p(self.stream.ptr)
            ),
            "cudaGraphLaunch",
        )

    def __del__(self) -> None:
        lib = _library()
        if getattr(self, "_exec", None):
            lib.cudaGraphExecDestroy(ctypes.c_void_p(self._exec))
            self._exec = None
        if getattr(self, "_graph", None):
            lib.cudaGraphDestroy(ctypes.c_void_p(self._graph))
            self._graph = None
