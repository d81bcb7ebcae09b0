"""`build-engine`: build an engine directory from a model."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from enginesmith.compiler import presets
from enginesmith.compiler.config import (
    BACKENDS,
    GPU_DTYPES,
    KV_CACHE_DTYPES,
    KV_GROUPINGS,
    QUANT_METHODS,
    QUANT_SCHEMES,
    QUANTIZE_MODES,
    TRT_ATTENTION,
    TRT_HARDWARE_COMPAT,
    BuildConfig,
)
from enginesmith.runtime.errors import EnginesmithError
from enginesmith.runtime.spec_policy import DEFAULT_MAX_DRAFT_LEN


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="build-engine",
        description=(
            "Compile a decoder LLM into an engine directory: load -> export to ONNX -> fuse "
            "attention into the FlashAttention plugin -> lower for the backend -> write and verify."
        ),
        epilog="presets: " + "; ".join(f"{k} ({v})" for k, v in presets.PRESETS.items()),
    )
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="a Hugging Face model directory (config.json + *.safetensors), a .gguf file, or a preset name",
    )
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        type=Path,
        metavar="ENGINE_DIR",
        help="engine directory to create (must not exist unless --force)",
    )
    parser.add_argument(
        "--backend",
        default="onnxruntime",
        choices=BACKENDS,
        help="runtime the engine targets: onnxruntime (CPU, fp32; the default), "
        "onnxruntime-gpu (ONNX Runtime's CUDA provider; needs onnxruntime-gpu) or tensorrt "
        "(a TensorRT plan; needs TensorRT or TensorRT-RTX, see docs/tensorrt.md)",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=4,
        metavar="N",
        help="KV-cache slots: how many requests the engine runs at once (default: 4)",
    )
    parser.add_argument(
        "--max-seq-len",
        type=int,
        default=2048,
        metavar="N",
        help="tokens per slot, prompt + generated; sets the KV-cache size (default: 2048)",
    )
    gpu = parser.add_argument_group("GPU backends (--backend onnxruntime-gpu | tensorrt)")
    gpu.add_argument(
        "--dtype",
        choices=GPU_DTYPES,
        default=None,
        help="weights, activations and KV cache of the GPU engine (default: float16; logits "
        "stay float32); TensorRT 11 takes precisions from the graph, so this is baked in",
    )
    gpu.add_argument(
        "--onnx-only",
        action="store_true",
        help="tensorrt: write the TensorRT-ready ONNX graph (model.onnx) and stop; needs "
        "neither TensorRT nor a GPU; build the plan later on the target",
    )
    gpu.add_argument(
        "--trt-attention",
        choices=TRT_ATTENTION,
        default="auto",
        help="tensorrt: attention ops to lower to: trt (TRT_KVCacheUpdate + TRT_Attention, "
        "per-row KV lengths), onnx (TensorScatter + Attention with a mask; also runs in ONNX "
        "Runtime, for side-by-side checks); auto = trt unless the model has a sliding window",
    )
    gpu.add_argument(
        "--trt-hardware-compat",
        choices=TRT_HARDWARE_COMPAT,
        default="none",
        help="tensorrt: GPUs the plan may run on: none (only the build GPU's compute "
        "capability, fastest), ampere-plus (any Ampere or newer GPU), same-cc (any GPU of the "
        "same compute capability)",
    )
    gpu.add_argument(
        "--trt-version-compatible",
        action="store_true",
        help="tensorrt: build a version-compatible plan that later TensorRT releases can load",
    )
    quant = parser.add_argument_group("weight-only quantization")
    quant.add_argument(
        "--quantize",
        choices=QUANTIZE_MODES,
        default=None,
        help="quantize MatMul weights, LM head and embedding to int8 or int4 "
        "(block-wise); default: keep fp32 weights",
    )
    quant.add_argument(
        "--block-size",
        type=int,
        default=32,
        metavar="N",
        help="weights per quantization block, a power of two >= 16 (default: 32)",
    )
    quant.add_argument(
        "--quant-scheme",
        choices=QUANT_SCHEMES,
        default="symmetric",
        help="symmetric (scale only) or asymmetric (scale + zero point) blocks",
    )
    quant.add_argument(
        "--quant-method",
        choices=QUANT_METHODS,
        default="auto",
        help="auto: weights that already sit on a 4-bit Q4_1 or 8-bit Q8_0 grid (a GGUF "
        "source) keep it exactly in blocks of 32 (Q4_1's offset as one small extra product per "
        "MatMul), other weights are rounded; rtn: round every weight to MatMulNBits' grid "
        "(--block-size, --quant-scheme); default: auto",
    )
    kv = parser.add_argument_group("KV-head collapse (MHA -> GQA/MQA)")
    kv.add_argument(
        "--kv-heads",
        type=int,
        default=None,
        metavar="N",
        help="collapse the model's KV heads to N (N must divide the current count); "
        "shrinks the KV cache; default: keep them",
    )
    kv.add_argument(
        "--kv-grouping",
        choices=KV_GROUPINGS,
        default="contiguous",
        help="which KV heads are pooled together: contiguous (GQA paper) or similarity "
        "(calibrated on text, AsymGQA-style); default: contiguous",
    )
    kv.add_argument(
        "--kv-recovery-minutes",
        type=float,
        default=4.0,
        metavar="M",
        help="after pooling, fit the attention (q, k, v, o projections) to the original "
        "model on calibration text for M minutes of wall-clock time in all: each layer to the "
        "original's attention output, then all layers together to its next-token "
        "distribution (distillation); 0 = pooling only; default: 4 (see docs/benchmarks.md, "
        "'Lossy options', for perplexity against minutes)",
    )
    kv.add_argument(
        "--calibration",
        type=Path,
        default=None,
        metavar="FILE",
        help="UTF-8 calibration text for --kv-grouping similarity and the --kv-cache-dtype "
        "scales (default: the calibration half of Python's pydoc docs)",
    )
    kvq = parser.add_argument_group("quantized KV cache")
    kvq.add_argument(
        "--kv-cache-dtype",
        choices=KV_CACHE_DTYPES,
        default="float32",
        help="element type of the KV cache: int8 (4x fewer bytes per token) or int4 (8x, two "
        "values per byte), symmetric with static per-layer, per-head, per-channel scales "
        "calibrated at build time on --calibration text (headroom x1.2 for int8, x0.8 for "
        "int4, measured) and recorded in kv_scales.json; onnxruntime CPU backend only; "
        "SmolLM2: int8 keeps perplexity within 0.1%%, int4 costs ~40%%; default: float32",
    )
    spec = parser.add_argument_group("speculative decoding (docs/speculative.md)")
    spec.add_argument(
        "--draft",
        default=None,
        metavar="SOURCE",
        help="draft source the runtime speculates with: ngram (prompt lookup), suffix "
        "(SuffixDecoding), self:int8 or self:int4 (the target quantized, built into "
        "ENGINE_DIR/draft), a model sharing the tokenizer, or a hybrid such as suffix+self:int8 "
        "(the model drafts when the model-free source finds nothing); default: none",
    )
    spec.add_argument(
        "--max-draft-len",
        type=int,
        default=DEFAULT_MAX_DRAFT_LEN,
        metavar="K",
        help="most draft tokens per request per step; the runtime picks K <= this from measured "
        f"acceptance and batch size (default: {DEFAULT_MAX_DRAFT_LEN})",
    )
    parser.add_argument(
        "--max-num-tokens",
        type=int,
        default=512,
        metavar="N",
        help="per-step token budget: decodes of running requests and prefill chunks of new ones "
        "share N tokens per engine step; smaller N = lower decode latency while others prefill "
        "(default: 512)",
    )
    parser.add_argument(
        "--strict-fusion",
        action="store_true",
        help="fail the build when any fusion rule (rotary, Q/K/V or gate/up packing, RMSNorm) "
        "misses a layer, instead of warning and building the slower engine; an unfused "
        "attention layer always fails the build",
    )
    parser.add_argument("--force", action="store_true", help="overwrite ENGINE_DIR if it exists")
    parser.add_argument(
        "--if-stale",
        action="store_true",
        help="build only when ENGINE_DIR does not already hold the engine this compiler builds "
        "with these settings (checked through its manifest), overwriting a stale one; for "
        "scripts that must not rebuild a current engine",
    )
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the final check of the engine's logits against transformers",
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="print only errors and the result path"
    )
    return parser


def build_engine_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from enginesmith.compiler.build import build  # heavy imports after --help

    log = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    try:
        config = BuildConfig(
            model=args.model,
            output=args.output,
            backend=args.backend,
            max_batch=args.max_batch,
            max_seq_len=args.max_seq_len,
            max_num_tokens=args.max_num_tokens,
            force=args.force,
            verify=not args.no_verify,
            strict_fusion=args.strict_fusion,
            quantize=args.quantize,
            block_size=args.block_size,
            quant_scheme=args.quant_scheme,
            quant_method=args.quant_method,
            kv_heads=args.kv_heads,
            kv_grouping=args.kv_grouping,
            kv_recovery_minutes=args.kv_recovery_minutes,
            calibration=args.calibration,
            kv_cache_dtype=args.kv_cache_dtype,
            dtype=args.dtype,
            onnx_only=args.onnx_only,
            trt_attention=args.trt_attention,
            trt_hardware_compat=args.trt_hardware_compat,
            trt_version_compatible=args.trt_version_compatible,
            draft=args.draft,
            max_draft_len=args.max_draft_len,
        )
        if args.if_stale:
            from enginesmith.compiler.artifact import stale_reason

            reason = stale_reason(config.output.expanduser(), config)
            if reason is None:
                log(f"{config.output} is up to date (this compiler, these settings): not rebuilt")
                if args.quiet:
                    print(args.output)
                return 0
            log(f"building {config.output}: {reason}")
            config = dataclasses.replace(config, force=True)
        build(config, log=log)
    except EnginesmithError as exc:
        print(f"build-engine: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("build-engine: interrupted; nothing was written", file=sys.stderr)
        return 130
    if args.quiet:
        print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(build_engine_main())
