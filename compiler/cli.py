"""`build-engine`: build an engine directory from a model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from enginesmith.compiler import presets
from enginesmith.compiler.config import BACKENDS, BuildConfig
from enginesmith.compiler.errors import EnginesmithError


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
        help="runtime the engine targets (default: onnxruntime, CPU)",
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
    parser.add_argument("--force", action="store_true", help="overwrite ENGINE_DIR if it exists")
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
            force=args.force,
            verify=not args.no_verify,
        )
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
