"""The draft engine of `build-engine --draft`: built by the same pipeline into ENGINE_DIR/draft.

`self:int8` / `self:int4` is the target through the weight-only quantization pass (the same
weights, already loaded); any other model must share the target's tokenizer. Model-free
drafts (ngram, suffix) build nothing: the manifest only records them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from enginesmith.compiler import sources
from enginesmith.compiler.config import BuildConfig
from enginesmith.runtime.errors import BuildError

DRAFT_DIR = "draft"


def build_draft(
    config: BuildConfig,
    engine_dir: Path,
    loaded: sources.LoadedModel,
    log: Any,
    build: Callable[..., dict[str, Any]],
) -> dict[str, Any]:
    """Build CONFIG's model draft (if any) into ENGINE_DIR/draft with BUILD (build.build,
    passed in: this module sits below it); the manifest's entry."""
    assert config.draft is not None
    entry: dict[str, Any] = {"draft": config.draft, "max_draft_len": config.max_draft_len}
    part = config.draft_model
    if part is None:
        return entry
    draft_config = dataclasses.replace(
        config,
        output=engine_dir / DRAFT_DIR,
        draft=None,
        force=True,
        verify=False,  # a draft's quality shows as acceptance, measured by the runtime
        kv_heads=None,
        quantize=part[5:] if part.startswith("self:") else None,
        model=config.model if part.startswith("self:") else part,
    )
    draft_loaded = loaded if part.startswith("self:") else sources.load_model(part)
    check_same_tokenizer(loaded, draft_loaded, part)
    log(f"      building the draft engine ({part}) into {DRAFT_DIR}/")
    draft_manifest = build(
        draft_config, log=lambda m: log("      draft: " + m), loaded=draft_loaded
    )
    entry["draft_dir"] = DRAFT_DIR
    entry["draft_manifest_sha256"] = draft_manifest["manifest_sha256"]
    return entry


def check_same_tokenizer(
    target: sources.LoadedModel, draft: sources.LoadedModel, name: str
) -> None:
    """A draft proposes token ids: its vocabulary must be the target's, id for id."""
    if target.tokenizer.get_vocab() != draft.tokenizer.get_vocab():
        raise BuildError(
            f"--draft {name}: its tokenizer differs from the target's (token ids would not "
            "mean the same text); choose a draft model of the same family, or self:int8"
        )
