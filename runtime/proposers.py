"""Pick the draft source for an engine: the one place that decides (like executors.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from enginesmith.runtime.errors import InvalidRequestError
from enginesmith.runtime.executor import Executor, SpinMode
from enginesmith.runtime.spec_policy import DEFAULT_MAX_DRAFT_LEN, DraftLengthPolicy
from enginesmith.runtime.spec_proposer import MODEL_FREE_SOURCES, Proposer, parse_draft_source
from enginesmith.runtime.speculation import Speculator


def make_speculator(
    source: str,
    engine_dir: Path,
    manifest: dict[str, Any],
    max_draft_len: int | None = None,
    threads: int | None = None,
    verify_files: bool = True,
    target: Executor | None = None,
    spin: SpinMode = "always",
) -> Speculator:
    """A Speculator for SOURCE ('ngram', 'suffix', 'self:int8', 'draft', a model engine path,
    or a hybrid 'suffix+self:int8' that asks the model only when the first finds nothing)."""
    k = max_draft_len or manifest.get("speculative", {}).get("max_draft_len", DEFAULT_MAX_DRAFT_LEN)
    if k < 1:
        raise InvalidRequestError(f"max_draft_len must be >= 1 (got {k})")
    parts = [
        _one(p, engine_dir, manifest, k, threads, verify_files, spin)
        for p in parse_draft_source(source)
    ]
    proposer: Proposer
    if len(parts) == 1:
        proposer = parts[0]
    else:
        from enginesmith.runtime.proposer_hybrid import HybridProposer

        proposer = HybridProposer(parts)
    for part in parts:  # c of a model draft: timed against the target when it is at hand
        if target is not None and hasattr(part, "measure_cost"):
            part.measure_cost(target)
    model = proposer if len(parts) == 1 else parts[-1]
    policy = DraftLengthPolicy(
        max_draft_len=k,
        draft_cost=float(getattr(model, "draft_cost", 0.0)),
        draft_cost_by_batch=dict(getattr(model, "cost_by_batch", {})),
        catch_up_cost=float(getattr(model, "catch_up_cost", 0.0)),
    )
    return Speculator(proposer, policy, manifest["max_seq_len"])


def _one(
    part: str,
    engine_dir: Path,
    manifest: dict[str, Any],
    max_draft_len: int,
    threads: int | None,
    verify: bool,
    spin: SpinMode,
) -> Proposer:
    if part == "ngram":
        from enginesmith.runtime.proposer_ngram import NgramProposer

        return NgramProposer()
    if part == "suffix":
        from enginesmith.runtime.proposer_suffix import SuffixProposer

        return SuffixProposer(max_draft_len)
    from enginesmith.runtime.proposer_draft_engine import DraftEngineProposer

    draft_dir = _draft_dir(part, engine_dir, manifest)
    return DraftEngineProposer.open(
        draft_dir,
        manifest,
        threads=threads,
        verify_files=verify,
        spin=spin,
    )


def uses_model_draft(source: str) -> bool:
    return any(p not in MODEL_FREE_SOURCES for p in parse_draft_source(source))


def _draft_dir(part: str, engine_dir: Path, manifest: dict[str, Any]) -> Path:
    """The engine directory of a model draft: ENGINE_DIR/draft for self:* (built by
    build-engine --draft), or a path to another engine directory."""
    if part.startswith("self:") or part == "draft":
        built = manifest.get("speculative", {}).get("draft_dir")
        if not built or not (engine_dir / built).is_dir():
            raise InvalidRequestError(
                f"{engine_dir} has no built draft engine for {part!r}: rebuild with "
                f"build-engine MODEL -o DIR --draft {part if part != 'draft' else 'self:int8'}"
            )
        have = manifest["speculative"]["draft"]
        if part != "draft" and part not in have.split("+"):
            raise InvalidRequestError(
                f"{engine_dir}'s draft engine is {have!r}, not {part!r}: rebuild with --draft {part}"
            )
        return engine_dir / built
    return Path(part.removeprefix("model:")).expanduser()
