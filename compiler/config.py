"""BuildConfig: every build-engine flag maps 1:1 onto a field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from enginesmith.runtime.errors import BuildError
from enginesmith.runtime.spec_policy import DEFAULT_MAX_DRAFT_LEN

# onnxruntime: CPU, fp32. onnxruntime-gpu: ONNX Runtime's CUDA provider, fp16/bf16.
# tensorrt: a TensorRT plan (model.plan) built from the same fp16/bf16 graph.
BACKENDS = ("onnxruntime", "onnxruntime-gpu", "tensorrt")
GPU_BACKENDS = ("onnxruntime-gpu", "tensorrt")
GPU_DTYPES = ("float16", "bfloat16")
TRT_ATTENTION = ("auto", "trt", "onnx")
TRT_HARDWARE_COMPAT = ("none", "ampere-plus", "same-cc")
QUANTIZE_MODES = ("int8", "int4")
QUANT_SCHEMES = ("symmetric", "asymmetric")
# auto: a weight already on a grid of its bits (a GGUF's Q4_1 / Q8_0) keeps it exactly
# (passes/weight_grid.py), others are rounded; rtn: round every weight to MatMulNBits' grid.
QUANT_METHODS = ("auto", "rtn")
KV_GROUPINGS = ("contiguous", "similarity")
KV_CACHE_DTYPES = ("float32", "int8", "int4")  # plugins/flash_attention/kv_quant.py
MODEL_FREE_DRAFTS = ("ngram", "suffix")


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
    strict_fusion: bool = False  # any fusion rule that misses a layer fails the build
    # Weight-only quantization (passes/quantize_weights.py); None = fp32 weights.
    quantize: str | None = None
    block_size: int = 32
    quant_scheme: str = "symmetric"
    quant_method: str = "auto"
    # KV-head collapse (passes/collapse_kv_heads.py); None = keep the model's KV heads.
    kv_heads: int | None = None
    kv_grouping: str = "contiguous"
    # minutes to fit the collapsed attention to the original model (compiler/kv_recovery.py);
    # 0 = mean pooling only. Used only with kv_heads.
    kv_recovery_minutes: float = 4.0
    calibration: Path | None = None  # calibration text (--kv-grouping similarity, KV scales)
    # KV-cache element type (compiler/kv_cache_calibration.py): int8 / int4 with static
    # per-channel scales calibrated at build time.
    kv_cache_dtype: str = "float32"
    # GPU backends (compiler/backends/tensorrt.py); dtype None = float16 there, float32 on CPU.
    dtype: str | None = None
    onnx_only: bool = False  # tensorrt: write the TensorRT-ready ONNX graph, build no plan
    trt_attention: str = "auto"  # op set of the attention lowering (TRT_* or standard ONNX)
    trt_hardware_compat: str = "none"  # TensorRT hardware-compatibility level of the plan
    trt_version_compatible: bool = False  # plan loadable by later TensorRT versions
    # Speculative decoding (docs/speculative.md): ngram | suffix | self:int8 | self:int4 | a
    # model sharing the tokenizer | hybrids "suffix+self:int8"; model drafts go to ENGINE_DIR/draft.
    draft: str | None = None
    max_draft_len: int = DEFAULT_MAX_DRAFT_LEN

    def __post_init__(self) -> None:
        self._check_gpu_options()
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
        if self.quant_method not in QUANT_METHODS:
            raise BuildError(
                f"--quant-method must be one of {', '.join(QUANT_METHODS)} "
                f"(got {self.quant_method!r})"
            )
        if self.kv_heads is not None and self.kv_heads < 1:
            raise BuildError(f"--kv-heads must be >= 1 (got {self.kv_heads})")
        if not 0 <= self.kv_recovery_minutes <= 600:  # also refuses NaN
            raise BuildError(
                f"--kv-recovery-minutes must be between 0 (no recovery) and 600 "
                f"(got {self.kv_recovery_minutes})"
            )
        if self.kv_grouping not in KV_GROUPINGS:
            raise BuildError(f"--kv-grouping must be one of {', '.join(KV_GROUPINGS)}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise BuildError(
                f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)} "
                f"(got {self.kv_cache_dtype!r})"
            )
        self._check_draft()

    def _check_draft(self) -> None:
        if not 1 <= self.max_draft_len <= 16:
            raise BuildError(f"--max-draft-len must be in 1..16 (got {self.max_draft_len})")
        if self.draft is None:
            return
        models = [p for p in self.draft.split("+") if p not in MODEL_FREE_DRAFTS]
        if len(models) > 1:
            raise BuildError(
                f"--draft {self.draft!r} names {len(models)} model drafts; a hybrid has at most "
                "one, after the model-free ones (e.g. suffix+self:int8)"
            )
        for part in models:
            if part.startswith("self:") and part[5:] not in QUANTIZE_MODES:
                raise BuildError(
                    f"--draft {part}: a self draft is self:int8 or self:int4 (the target through "
                    "the weight-only quantization pass)"
                )
            if not part:
                raise BuildError(f"--draft {self.draft!r} has an empty part")
        if models and self.backend != "onnxruntime":
            raise BuildError("--draft with a model draft is built for --backend onnxruntime only")

    @property
    def draft_model(self) -> str | None:
        """The model part of --draft (built into ENGINE_DIR/draft), or None."""
        if self.draft is None:
            return None
        models = [p for p in self.draft.split("+") if p not in MODEL_FREE_DRAFTS]
        return models[0] if models else None

    def _check_gpu_options(self) -> None:
        if self.dtype is not None and self.dtype not in GPU_DTYPES:
            raise BuildError(f"--dtype must be one of {', '.join(GPU_DTYPES)} (got {self.dtype!r})")
        if self.dtype is not None and self.backend not in GPU_BACKENDS:
            raise BuildError(
                f"--dtype {self.dtype} is for the GPU backends ({', '.join(GPU_BACKENDS)}); "
                "the onnxruntime CPU engine is float32: drop --dtype or add --backend tensorrt"
            )
        if self.onnx_only and self.backend != "tensorrt":
            raise BuildError("--onnx-only applies to --backend tensorrt only")
        if self.trt_attention not in TRT_ATTENTION:
            raise BuildError(f"--trt-attention must be one of {', '.join(TRT_ATTENTION)}")
        if self.trt_hardware_compat not in TRT_HARDWARE_COMPAT:
            raise BuildError(
                f"--trt-hardware-compat must be one of {', '.join(TRT_HARDWARE_COMPAT)}"
            )
        if self.backend in GPU_BACKENDS and self.quantize is not None:
            raise BuildError(
                f"--quantize builds ONNX Runtime CPU kernels (MatMulNBits) and is not available "
                f"with --backend {self.backend}: drop --quantize"
            )
        if self.backend in GPU_BACKENDS and self.kv_cache_dtype != "float32":
            raise BuildError(
                f"--kv-cache-dtype {self.kv_cache_dtype} runs in ONNX Runtime's CPU "
                f"GroupQueryAttention only, not with --backend {self.backend}: drop it"
            )

    def fingerprint_fields(self) -> dict[str, object]:
        """The fields that shape the engine (not where it goes or how it is checked)."""
        skip = {"output", "force", "verify", "strict_fusion"}
        return {
            k: str(v) if isinstance(v, Path) else v
            for k, v in dataclasses.asdict(self).items()
            if k not in skip
        }

    @property
    def lossy(self) -> bool:
        """Whether a pass that changes the model's outputs is requested (quality is reported)."""
        return (
            self.quantize is not None
            or self.kv_heads is not None
            or self.kv_cache_dtype != "float32"
        )
