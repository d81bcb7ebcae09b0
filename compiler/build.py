"""build(): model source -> export -> pass pipeline -> backend -> verified engine directory."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

import enginesmith
from enginesmith.compiler import artifact, export, fusion_report, pipeline, quality, sources
from enginesmith.compiler.backends import onnxruntime as ort_backend
from enginesmith.compiler.backends import tensorrt as gpu_backend
from enginesmith.compiler.config import BuildConfig
from enginesmith.runtime.errors import BuildError

VERIFY_TEXT = (
    "The engine is checked against the reference implementation: the same weights must give "
    "the same next-token logits."
)
# Build-time check: relative to the largest |logit|; fp32 engines differ by ~1e-6 here.
VERIFY_RTOL = 1e-3
# Batched decode steps the verify stage runs after its prefill (verify_decode).
VERIFY_DECODE_STEPS = 3

Log = Callable[[str], None]


def eos_token_ids(loaded: sources.LoadedModel) -> list[int]:
    ids: set[int] = set()
    for source in (loaded.config, getattr(loaded.model, "generation_config", None)):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(int(loaded.tokenizer.eos_token_id))
    return sorted(ids)


class _Stages:
    """Prints `[i/n] name ... done in X s` lines and records stage times."""

    def __init__(self, total: int, log: Log) -> None:
        self.total, self.log, self.index = total, log, 0
        self.seconds: dict[str, float] = {}

    def run(
        self, name: str, fn: Callable[[], Any], detail: Callable[[Any], str] = lambda _: ""
    ) -> Any:
        self.index += 1
        self.log(f"[{self.index}/{self.total}] {name} ...")
        start = time.perf_counter()
        result = fn()
        self.seconds[name] = round(time.perf_counter() - start, 3)
        extra = detail(result)
        self.log(f"      done in {self.seconds[name]:.1f} s{'  ' + extra if extra else ''}")
        return result


def build(
    config: BuildConfig, log: Log = print, loaded: sources.LoadedModel | None = None
) -> dict[str, Any]:
    """Build CONFIG.model into an engine directory at CONFIG.output; return the manifest.

    LOADED: the model already loaded (a self draft is built from the target's weights)."""
    # Refuse an existing output before spending minutes on the build.
    output = config.output.expanduser().resolve()
    if output.exists() and not config.force:
        from enginesmith.runtime.errors import EngineDirError

        raise EngineDirError(
            f"{output} already exists: pass --force to overwrite it, or choose another -o"
        )
    if config.backend != "onnxruntime":  # e.g. no TensorRT installed: say so before the export
        gpu_backend.check_build_environment(config)
    quantized_cache = config.kv_cache_dtype != "float32"
    stages = _Stages((5 if config.verify else 4) + quantized_cache + _recovers(config), log)
    loaded = stages.run(
        f"load {config.model}",
        lambda: loaded or sources.load_model(config.model),
        lambda m: (
            f"{m.architecture}, {sum(p.numel() for p in m.model.parameters()) / 1e6:.1f}M params"
        ),
    )
    if config.kv_heads is not None:  # a bad --kv-heads fails before the minute-long export
        from enginesmith.passes.base import PassError
        from enginesmith.passes.collapse_kv_heads import check_target

        src = export.ModelDims.from_config(loaded.config)
        try:
            check_target(config.kv_heads, src.num_heads, src.num_kv_heads)
        except PassError as exc:
            raise BuildError(str(exc)) from exc
    source_model, recovery = loaded.model, None
    if _recovers(config, loaded):  # collapse in the transformers model, then fit (kv_recovery.py)
        from enginesmith.compiler import kv_recovery

        target = config.kv_heads
        assert target is not None
        source_model, recovery = stages.run(
            f"collapse to {config.kv_heads} KV heads and recover "
            f"({config.kv_recovery_minutes:g} min budget)",
            lambda: kv_recovery.collapse_with_recovery(
                loaded.model,
                loaded.tokenizer,
                target,
                config.kv_grouping,
                config.calibration,
                config.kv_recovery_minutes,
                log,
            ),
            lambda r: r[1].summary(),
        )
    exported = stages.run(
        "export to ONNX (torch dynamo, opset 23)",
        lambda: export.export_model(source_model),
        lambda r: f"{r.model.graph.num_nodes()} nodes, {r.weight_bytes / 1e6:.1f} MB of weights",
    )
    dims: export.ModelDims = exported.dims
    if config.max_seq_len > dims.max_position_embeddings:
        log(
            f"      note: --max-seq-len {config.max_seq_len} exceeds the model's trained context "
            f"({dims.max_position_embeddings})"
        )

    def log_pass(r: pipeline.PassRecord) -> None:
        hidden = (
            "fused_layers",
            "packed_layers",
            "norm_layers",
            "groups",
            "per_layer_reconstruction_error",
            "calibration",
        )
        summary = {k: v for k, v in r.report.items() if k not in hidden}
        log(f"      {r.name:<28} {r.seconds:6.2f} s  nodes={r.nodes_after}  {json.dumps(summary)}")

    pass_inputs = pipeline.PassInputs(config=config, loaded=loaded)
    records = stages.run(
        f"passes for {config.backend}",
        lambda: pipeline.run_pipeline(
            exported.model, pipeline.PIPELINES[config.backend](dims, pass_inputs), log_pass
        ),
    )
    fusion = fusion_report.coverage(records, dims.num_layers)
    for line in fusion_report.format_report(fusion):
        log(line)
    for line in fusion_report.check(fusion, config.strict_fusion):
        log(line)
    collapse = next((r for r in records if r.name == "collapse-kv-heads"), None)
    if collapse is not None:  # the runtime sizes its KV cache from the manifest's dims
        dims = dataclasses.replace(dims, num_kv_heads=collapse.report["kv_heads_after"])

    manifest: dict[str, Any] = {}
    with artifact.atomic_engine_dir(output, config.force) as tmp:

        def write() -> dict[str, Any]:
            if config.backend == "onnxruntime":
                roles = ort_backend.write_engine_files(exported.model, loaded.tokenizer, tmp)
            else:  # GPU backends: the same graph, plus model.plan for tensorrt
                roles, trt_entry = gpu_backend.write_engine_files(
                    exported.model, loaded.tokenizer, tmp, config, dims, log
                )
            kv_shape = [config.max_batch, dims.num_kv_heads, config.max_seq_len, dims.head_dim]
            manifest.update(
                {
                    "enginesmith_version": enginesmith.__version__,
                    "compiler_fingerprint": artifact.compiler_fingerprint(config),
                    "build_config": config.fingerprint_fields(),
                    "backend": config.backend,
                    "backend_versions": ort_backend.runtime_versions(),
                    "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "source": {
                        "model": config.model,
                        "kind": loaded.source_kind,
                        "path": loaded.source_path,
                    },
                    "architecture": loaded.architecture,
                    "model": asdict(dims),
                    "max_batch": config.max_batch,
                    "max_seq_len": config.max_seq_len,
                    "max_num_tokens": config.max_num_tokens,
                    "kv_cache": {
                        "layout": "slots",
                        "format": "BNSH",
                        "dtype": "float32",
                        "shape_per_layer": kv_shape,
                        "num_kv_heads": dims.num_kv_heads,
                        "bytes_per_token": dims.kv_bytes_per_token(),
                        "total_bytes": 2 * dims.num_layers * int(np.prod(kv_shape)) * 4,
                    },
                    "dtypes": {"weights": "float32", "activations": "float32"},
                    "eos_token_ids": eos_token_ids(loaded),
                    "passes": [r.name for r in records],
                    "io": {
                        "inputs": [v.name for v in exported.model.graph.inputs],
                        "outputs": [v.name for v in exported.model.graph.outputs],
                    },
                    "files_by_role": roles,
                }
            )
            quantized = next((r for r in records if r.name == "quantize-weights"), None)
            if quantized is not None:  # weight-only quantization: the scheme, for readers
                from enginesmith.passes.quantize_weights import manifest_entry

                manifest["quantization"] = manifest_entry(quantized.report)
                manifest["dtypes"]["weights"] = manifest["quantization"]["mode"]
            if config.backend != "onnxruntime":  # fp16/bf16 KV cache with a scratch tail
                lowering = next(r for r in records if r.name == "lower-flash-attention-trt")
                manifest.update(
                    gpu_backend.manifest_entries(config, dims, trt_entry, lowering.report)
                )
            return roles

        stages.run("write engine directory", write, lambda _: f"{_dir_mb(tmp):.1f} MB")
        kv_report = None
        if quantized_cache:  # scales are measured on the engine just written (fp32 cache)
            from enginesmith.compiler import kv_cache_calibration

            kv_report = stages.run(
                f"calibrate the {config.kv_cache_dtype} KV cache's scales",
                lambda: kv_cache_calibration.quantize_engine_kv_cache(
                    tmp,
                    manifest,
                    exported.model,
                    loaded.tokenizer,
                    config.kv_cache_dtype,
                    config.calibration,
                ),
                lambda r: (
                    f"{r['bytes_per_token']} B/token (fp32 {r['bytes_per_token_fp32']}); "
                    f"2048-token sequences in 512 MiB: {r['max_batch_2048_tokens_in_512_mib']} "
                    f"(fp32 {r['max_batch_2048_tokens_in_512_mib_fp32']})"
                ),
            )
        report: dict[str, Any] = {
            "model": config.model,
            "export": {
                "seconds": round(exported.seconds, 3),
                "weight_bytes": exported.weight_bytes,
            },
            "passes": [r.as_dict() for r in records],
            "fusion": {r.rule: r.as_dict() for r in fusion},
        }
        if kv_report is not None:
            report["kv_cache"] = kv_report
        if recovery is not None:
            report["kv_recovery"] = recovery.as_dict()
        if config.verify and config.lossy and _cannot_verify(config) is None:
            # A lossy pass changed the outputs on purpose: measure what it cost instead.
            report["quality"] = stages.run(
                "measure quality against the fp32 model (held-out text)",
                lambda: measure_quality(tmp, manifest, loaded).as_dict(),
                lambda q: quality.QualityReport(
                    q["tokens"],
                    q["perplexity_reference"],
                    q["perplexity_engine"],
                    q["top1_agreement"],
                ).summary(),
            )
        elif config.verify and (why := _cannot_verify(config)) is not None:
            log(f"      verify skipped: {why}")
            report["verify"] = {"skipped": why}
        elif config.verify:
            report["verify"] = stages.run(
                "verify logits against transformers",
                lambda: verify_engine(tmp, manifest, loaded),
                lambda v: (
                    f"max |diff| {v['max_abs_diff']:.2e} (relative {v['relative_diff']:.2e})"
                    + (
                        f", decode steps {v['decode_max_abs_diff']:.2e}"
                        if "decode_max_abs_diff" in v
                        else ""
                    )
                ),
            )
        if config.draft is not None:  # speculative decoding: the draft engine, hashed below
            from enginesmith.compiler.draft import build_draft

            manifest["speculative"] = build_draft(config, tmp, loaded, log, build)
        report["stage_seconds"] = stages.seconds
        (tmp / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
        written = artifact.write_manifest(tmp, manifest)
    log(f"engine written to {output}")
    return written


def measure_quality(
    engine_dir: Path, manifest: dict[str, Any], loaded: sources.LoadedModel
) -> quality.QualityReport:
    """Perplexity and top-1 agreement of the built engine vs the fp32 reference model."""
    from enginesmith.runtime.executors import open_executor

    session = open_executor(engine_dir, manifest)
    tokens = min(1024, manifest["max_seq_len"])
    return quality.evaluate_engine(session, loaded.model, loaded.tokenizer, num_tokens=tokens)


def verify_engine(
    engine_dir: Path, manifest: dict[str, Any], loaded: sources.LoadedModel
) -> dict[str, Any]:
    """Prefill a fixed text through the engine and through transformers; compare all logits."""
    import torch

    from enginesmith.runtime.executors import open_executor

    limit = min(manifest["max_seq_len"] - 1, manifest.get("max_step_tokens", 1 << 30))
    ids = loaded.tokenizer(VERIFY_TEXT).input_ids[:limit]
    n = len(ids)
    session = open_executor(engine_dir, manifest)
    logits = session.step(
        0,
        np.array([ids]),
        np.arange(n)[None],
        np.array([n - 1], np.int32),
        np.array([n], np.int32),
        np.arange(n),
    )
    with torch.no_grad():
        reference = loaded.model(torch.tensor([ids])).logits[0].float().numpy()
    scale = float(np.abs(reference).max())
    diff = float(np.abs(logits - reference).max())
    relative = diff / scale
    agree = float((logits.argmax(-1) == reference.argmax(-1)).mean())
    # fp16/bf16 GPU engines round every activation: their own limit (backends/tensorrt.py).
    rtol = gpu_backend.VERIFY_RTOL.get(manifest.get("dtypes", {}).get("activations"), VERIFY_RTOL)
    if relative > rtol:
        raise BuildError(
            f"engine logits differ from transformers by {relative:.2e} (relative, limit {rtol}); "
            "this is a compiler bug: report it with the model's config.json"
        )
    result = {"tokens": n, "max_abs_diff": diff, "relative_diff": relative, "top1_agreement": agree}
    decode_diff = verify_decode(session, ids, reference)
    if decode_diff is not None:
        if decode_diff / scale > rtol:
            raise BuildError(
                f"engine logits of batched decode steps differ from transformers by "
                f"{decode_diff / scale:.2e} (relative, limit {rtol}) while its prefill matches; "
                "this is a compiler or runtime bug: report it with the model's config.json"
            )
        result["decode_max_abs_diff"] = decode_diff
    return result


def verify_decode(session: Any, ids: list[int], reference: np.ndarray) -> float | None:
    """Max |logit diff| of a batched prefill then VERIFY_DECODE_STEPS batched decode steps
    against REFERENCE (transformers' logits [len(ids), vocab] of IDS); None if IDS is too short.

    Row r (up to 2 rows, slots 0 and 1) prefills the first len(ids) - steps - r tokens, then
    decodes the next tokens one per step: rows at different cached lengths share every step, as
    in serving. A prefill-only check misses what differs per row or per step (a bias added to
    one row only, a decode-only path).
    """
    rows, steps = min(2, session.max_batch), VERIFY_DECODE_STEPS
    prefix = [len(ids) - steps - r for r in range(rows)]  # [rows] tokens cached before decoding
    if prefix[-1] < 1:
        return None
    width = prefix[0]
    input_ids = np.zeros((rows, width), np.int64)  # right-padded
    position_ids = np.zeros((rows, width), np.int64)
    for r, length in enumerate(prefix):
        input_ids[r, :length] = ids[:length]
        position_ids[r, :length] = np.arange(length)
    lengths = np.array(prefix, np.int32)
    logits = session.step(
        0,
        input_ids,
        position_ids,
        lengths - 1,
        lengths,
        np.array([r * width + length - 1 for r, length in enumerate(prefix)]),
    )  # [rows, vocab]: each row's last prompt position
    worst = float(np.abs(logits - reference[lengths - 1]).max())
    for j in range(steps):
        positions = lengths + j  # [rows]
        logits = session.step(
            0,
            np.array(ids)[positions][:, None],
            positions[:, None].astype(np.int64),
            positions.astype(np.int32),
            np.ones(rows, np.int32),
            np.arange(rows),
        )
        worst = max(worst, float(np.abs(logits - reference[positions]).max()))
    return worst


def _recovers(config: BuildConfig, loaded: sources.LoadedModel | None = None) -> bool:
    """Whether --kv-heads collapses with a recovery step (before the export) rather than by the
    ONNX pass's mean pooling alone."""
    if config.kv_heads is None or config.kv_recovery_minutes <= 0:
        return False
    if loaded is None:
        return True
    kv_heads = loaded.config.num_key_value_heads or loaded.config.num_attention_heads
    return bool(config.kv_heads < kv_heads)


def _cannot_verify(config: BuildConfig) -> str | None:
    """Why this machine cannot run the built engine (None: it can)."""
    return None if config.backend == "onnxruntime" else gpu_backend.cannot_verify(config)


def _dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6
