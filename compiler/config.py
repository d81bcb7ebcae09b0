"""BuildConfig: every build-engine flag maps 1:1 onto a field."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from enginesmith.compiler.errors import BuildError

BACKENDS = ("onnxruntime",)


@dataclass(frozen=True)
class BuildConfig:
    """What to build: the model, where to, for which backend and with which capacity."""

    model: str
    output: Path
    backend: str = "onnxruntime"
    max_batch: int = 4  # KV-cache slots: requests that can run at once
    max_seq_len: int = 2048  # tokens per slot (prompt + generated)
    force: bool = False
    verify: bool = True  # compare the engine's logits with transformers' after building

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise BuildError(
                f"backend {self.backend!r} is not available; choose one of {', '.join(BACKENDS)}"
            )
        if self.max_batch < 1:
            raise BuildError(f"--max-batch must be >= 1 (got {self.max_batch})")
        if self.max_seq_len < 2:
            raise BuildError(f"--max-seq-len must be >= 2 (got {self.max_seq_len})")
