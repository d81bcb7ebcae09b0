"""BuildConfig: every build-engine flag maps 1:1 onto a field."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from enginesmith.compiler.errors import BuildError

BACKENDS = ("onnxruntime",)
QUANTIZE_MODES = ("int8", "int4")
QUANT_SCHEMES = ("symmetric", "asymmetric")
KV_GROUPINGS = ("contiguous", "similarity")


@dataclass(frozen=True)
class BuildConfig:
    """What to build: the model, where to, for which backend and with which capacity."""

    model: str
    output: Path
    backend: str = "onnxruntime"
    max_batch: int = 4  # KV-cache slots: requests that can run at once
    max_seq_len: int = 2048  # tokens per slot (prompt + generated)
    max_num_tokens: int = 512  # per-step token budget of the runtime's scheduler
    force: bool = False
    verify: bool = True  # compare the engine's logits with transformers' after building
    # Weight-only quantization (passes/quantize_weights.py); None = fp32 weights.
    quantize: str | None = None
    block_size: int = 32
    quant_scheme: str = "symmetric"
    # KV-head collapse (passes/collapse_kv_heads.py); None = keep the model's KV heads.
    kv_heads: int | None = None
    kv_grouping: str = "contiguous"
    calibration: Path | None = None  # calibration text for --kv-grouping similarity

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise BuildError(
                f"backend {self.backend!r} is not available; choose one of {', '.join(BACKENDS)}"
            )
        if self.max_batch < 1:
            raise BuildError(f"--max-batch must be >= 1 (got {self.max_batch})")
        if self.max_seq_len < 2:
            raise BuildError(f"--max-seq-len must be >= 2 (got {self.max_seq_len})")
        if self.max_num_tokens < 1:
            raise BuildError(f"--max-num-tokens must be >= 1 (got {self.max_num_tokens})")
        if self.quantize is not None and self.quantize not in QUANTIZE_MODES:
            raise BuildError(
                f"--quantize must be one of {', '.join(QUANTIZE_MODES)} (got {self.quantize!r})"
            )
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise BuildError(f"--block-size must be a power of two >= 16 (got {self.block_size})")
        if self.quant_scheme not in QUANT_SCHEMES:
            raise BuildError(f"--quant-scheme must be one of {', '.join(QUANT_SCHEMES)}")
        if self.kv_heads is not None and self.kv_heads < 1:
            raise BuildError(f"--kv-heads must be >= 1 (got {self.kv_heads})")
        if self.kv_grouping not in KV_GROUPINGS:
            raise BuildError(f"--kv-grouping must be one of {', '.join(KV_GROUPINGS)}")

    @property
    def lossy(self) -> bool:
        """Whether a pass that changes the model's outputs is requested (quality is reported)."""
        return self.quantize is not None or self.kv_heads is not None
