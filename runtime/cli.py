"""`enginesmith`: run engine directories (generate, chat, inspect)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from enginesmith.runtime.errors import EnginesmithError, InvalidRequestError


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-tokens",
        type=int,
        default=64,
        metavar="N",
        help="tokens to generate at most (default: 64)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        metavar="T",
        help="sampling temperature; 0 = greedy (default: 0)",
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=0,
        metavar="K",
        help="sample from the K most likely tokens; 0 = off",
    )
    p.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        metavar="P",
        help="nucleus sampling: smallest token set with probability >= P, in (0, 1] (default: 1)",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop when TEXT is generated (not included in the output); repeatable",
    )
    p.add_argument(
        "--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token"
    )
    p.add_argument("--no-stream", action="store_true", help="print the whole completion at the end")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="enginesmith", description="Run enginesmith engine directories."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser(
        "generate",
        help="complete a prompt with an engine",
        description="Complete PROMPT with the engine in ENGINE_DIR; prints text and speed.",
    )
    gen.add_argument(
        "engine_dir", type=Path, metavar="ENGINE_DIR", help="directory made by build-engine"
    )
    gen.add_argument("prompt", metavar="PROMPT", help="text to complete")
    gen.add_argument(
        "--chat",
        action="store_true",
        help="wrap PROMPT as a user message in the model's chat template",
    )
    _add_sampling_flags(gen)
    spec = gen.add_argument_group("speculative decoding (docs/speculative.md)")
    spec.add_argument(
        "--no-speculation",
        action="store_true",
        help="decode with the target alone even when the engine has a draft",
    )
    spec.add_argument(
        "--draft",
        default=None,
        metavar="SOURCE",
        help="speculate with SOURCE without a rebuild: ngram, suffix, a built self:int8 draft, "
        "another engine directory sharing the tokenizer, or a hybrid such as suffix+self:int8",
    )
    spec.add_argument(
        "--max-draft-len",
        type=int,
        default=None,
        metavar="K",
        help="most draft tokens per step (default: the engine's build setting)",
    )

    ins = sub.add_parser(
        "inspect",
        help="show an engine's manifest, files and build report",
        description="Print ENGINE_DIR's manifest, file sizes and build report as tables.",
    )
    ins.add_argument(
        "engine_dir", type=Path, metavar="ENGINE_DIR", help="directory made by build-engine"
    )
    ins.add_argument(
        "--json", action="store_true", help="print the raw manifest and build report as JSON"
    )

    _add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "serve":
            return _serve(args)
        return _inspect(args)
    except EnginesmithError as exc:
        print(f"enginesmith: error: {exc}", file=sys.stderr)
        return 2


def _add_serve_parser(sub: Any) -> None:
    srv = sub.add_parser(
        "serve",
        help="serve an engine over an OpenAI-compatible HTTP API",
        description="Serve ENGINE_DIR over an OpenAI-compatible HTTP API (/v1/completions, "
        "/v1/chat/completions, /v1/models, /tokenize, /detokenize, /health, /metrics). All "
        "requests share one in-flight batching engine loop. SIGTERM or Ctrl-C stops accepting "
        "requests, lets running ones finish (up to --shutdown-timeout) and exits 0.",
    )
    srv.add_argument(
        "engine_dir", type=Path, metavar="ENGINE_DIR", help="directory made by build-engine"
    )
    srv.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 = all)",
    )
    srv.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    srv.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="require `Authorization: Bearer KEY` on every route but /health (default: the "
        "ENGINESMITH_API_KEY variable; none = no key)",
    )
    srv.add_argument(
        "--max-queue",
        type=int,
        default=256,
        metavar="N",
        help="requests that may wait for a KV slot; more get 429 with Retry-After (default: 256)",
    )
    srv.add_argument(
        "--served-model-name",
        default=None,
        metavar="NAME",
        help="model name clients pass as `model` and /v1/models lists (default: the engine "
        "directory's name)",
    )
    srv.add_argument(
        "--shutdown-timeout",
        type=int,
        default=30,
        metavar="S",
        help="on SIGTERM, seconds to let in-flight requests finish before cancelling them "
        "(default: 30)",
    )
    srv.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="ONNX Runtime intra-op threads (default: the engine's setting)",
    )
    srv.add_argument(
        "--replicas",
        type=int,
        default=1,
        metavar="N",
        help="engine replicas; N > 1 serves through Ray Serve (N copies of the engine behind one "
        "endpoint; needs the serve-ray extra; docs/serving.md)",
    )
    srv.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn log level (default: info)",
    )


def _serve(args: argparse.Namespace) -> int:
    import os

    from enginesmith.runtime.errors import InvalidRequestError

    if args.max_queue < 1 or args.replicas < 1 or args.shutdown_timeout < 0:
        raise InvalidRequestError(
            "--max-queue and --replicas must be >= 1 and --shutdown-timeout >= 0"
        )
    api_key = args.api_key or os.environ.get("ENGINESMITH_API_KEY") or None
    engine_dir = args.engine_dir.expanduser().resolve()
    name = args.served_model_name or engine_dir.name
    if args.replicas > 1:
        from enginesmith.runtime.serve_ray import run as run_on_ray

        return run_on_ray(
            engine_dir,
            replicas=args.replicas,
            host=args.host,
            port=args.port,
            model_name=name,
            api_key=api_key,
            max_queue=args.max_queue,
            threads=args.threads,
        )
    from enginesmith.runtime.engine_dir import read_manifest
    from enginesmith.runtime.llm import LLM
    from enginesmith.runtime.server import create_app, serve_forever

    read_manifest(engine_dir, verify_hashes=False)  # a bad ENGINE_DIR fails here, not later

    def load() -> LLM:
        # spin_wait=False: spinning ORT workers starve the event loop's thread.
        return LLM(engine_dir, threads=args.threads, max_waiting=args.max_queue, spin_wait=False)

    app = create_app(load, model_name=name, api_key=api_key)
    print(
        f"enginesmith: serving {engine_dir} as `{name}` on http://{args.host}:{args.port}/v1 "
        "(the engine loads in the background; /health answers 200 once it is ready)",
        file=sys.stderr,
        flush=True,
    )
    return serve_forever(app, args.host, args.port, args.shutdown_timeout, args.log_level)


def _generate(args: argparse.Namespace) -> int:
    from enginesmith.runtime.llm import LLM
    from enginesmith.runtime.sampling import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )
    llm = LLM(
        args.engine_dir,
        speculative=not args.no_speculation,
        draft=args.draft,
        max_draft_len=args.max_draft_len,
    )
    prompt = args.prompt
    if args.chat:
        # Checked here for the CLI's fix; transformers would raise a multi-line ValueError.
        if not getattr(llm.tokenizer, "chat_template", None):
            raise InvalidRequestError("this model has no chat template: run without --chat")
        prompt = llm.chat_prompt([{"role": "user", "content": prompt}])
    stream = llm.stream(prompt, params)
    for delta in stream:
        if not args.no_stream:
            print(delta, end="", flush=True)
    out = stream.output
    assert out is not None  # set when the stream is exhausted
    if args.no_stream:
        print(out.text, end="")
    s = out.stats
    print(
        f"\n\n[{s.prompt_tokens} prompt tokens, {s.generated_tokens} generated, finish={out.finish_reason}; "
        f"prefill {s.prefill_tokens_per_s:.0f} tok/s, decode {s.decode_tokens_per_s:.1f} tok/s, "
        f"first token {s.time_to_first_token_s * 1000:.0f} ms]",
        file=sys.stderr,
    )
    if s.spec.rounds:
        print(
            f"[speculation: {s.spec.draft_tokens} draft tokens, {s.spec.accepted_tokens} accepted "
            f"({s.spec.acceptance_rate:.0%}), {s.spec.tokens_per_target_call:.2f} tokens per "
            f"target call, {s.spec.draft_s * 1000:.0f} ms drafting]",
            file=sys.stderr,
        )
    return 0


def _table(rows: list[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _kv_cache_line(kv: dict[str, Any]) -> str:
    dtype = kv["dtype"]
    if kv.get("bit_width"):  # a quantized cache: only GroupQueryAttention's CPU kernel reads it
        dtype += (
            f" ({kv['quant_type']} static scales in {kv['scales_file']}; read by ONNX Runtime's "
            "CPU GroupQueryAttention only, no other attention path)"
        )
    return (
        f"{kv['layout']} {kv['format']} {dtype}, {kv['bytes_per_token']} B/token, "
        f"{kv['total_bytes'] / 2**20:.1f} MiB preallocated"
    )


def _inspect(args: argparse.Namespace) -> int:
    from enginesmith.runtime.engine_dir import read_manifest

    root = args.engine_dir
    manifest = read_manifest(root)
    report_path = root / "build_report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    if args.json:
        print(json.dumps({"manifest": manifest, "build_report": report}, indent=2))
        return 0
    m, kv = manifest["model"], manifest["kv_cache"]
    print(f"engine {root}  (files verified)")
    print(
        _table(
            [
                ("format_version", manifest["format_version"]),
                ("enginesmith", manifest["enginesmith_version"]),
                ("backend", f"{manifest['backend']} {manifest.get('backend_versions', {})}"),
                ("source", f"{manifest['source']['model']} ({manifest['source']['kind']})"),
                ("architecture", manifest["architecture"]),
                ("layers / hidden", f"{m['num_layers']} / {m['hidden_size']}"),
                (
                    "heads / kv heads / dim",
                    f"{m['num_heads']} / {m['num_kv_heads']} / {m['head_dim']}",
                ),
                ("vocab", m["vocab_size"]),
                ("sliding window", m["sliding_window"]),
                (
                    "max batch / seq len / tokens",
                    f"{manifest['max_batch']} / {manifest['max_seq_len']} / "
                    f"{manifest.get('max_num_tokens', '-')} per step",
                ),
                ("kv cache", _kv_cache_line(kv)),
                ("dtypes", manifest["dtypes"]),
                ("passes", ", ".join(manifest["passes"])),
                ("eos token ids", manifest["eos_token_ids"]),
            ]
        )
    )
    print("\nfiles")
    print(
        _table(
            [
                (rel, f"{(root / rel).stat().st_size / 1e6:10.2f} MB  sha256 {h[:12]}")
                for rel, h in manifest["files"].items()
            ]
        )
    )
    if report:
        print("\nbuild report")
        rows: list[tuple[str, Any]] = [
            (f"stage: {k}", f"{v:.2f} s") for k, v in report.get("stage_seconds", {}).items()
        ]
        for p in report.get("passes", []):
            detail = {
                k: v
                for k, v in p.items()
                if k not in ("name", "seconds", "modified", "fused_layers")
            }
            rows.append((f"pass: {p['name']}", f"{p['seconds']:.2f} s  {json.dumps(detail)}"))
        if "verify" in report:
            v = report["verify"]
            rows.append(
                (
                    "verify vs transformers",
                    f"max |diff| {v['max_abs_diff']:.2e}, relative {v['relative_diff']:.2e}, "
                    f"top-1 agreement {v['top1_agreement']:.3f} over {v['tokens']} tokens",
                )
            )
        if "quality" in report:
            q = report["quality"]
            rows.append(
                (
                    "quality vs fp32 (held-out)",
                    f"perplexity {q['perplexity_reference']:.3f} -> {q['perplexity_engine']:.3f}, "
                    f"top-1 agreement {q['top1_agreement']:.3f} over {q['tokens']} tokens",
                )
            )
        print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
