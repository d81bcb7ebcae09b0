"""Quality of a built engine against the fp32 reference model: perplexity and top-1 agreement
on real held-out text. Every lossy pass (KV-head collapse, weight quantization) reports these.

Text comes offline from Python's own documentation (`pydoc_data.topics`). Topics repeat whole
paragraphs, so the corpus is first deduplicated paragraph by paragraph (in sorted topic order);
even paragraphs are calibration text and odd ones are held out, so a quality figure is never
measured on text a pass was calibrated on.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Prefill chunk for evaluation: one engine call per chunk, logits for every position.
EVAL_CHUNK = 512


def _paragraphs(parity: int) -> str:
    from pydoc_data.topics import topics

    unique: dict[str, None] = {}  # insertion-ordered set
    for key in sorted(topics):
        for paragraph in topics[key].split("\n\n"):
            if paragraph.strip():
                unique.setdefault(paragraph.strip("\n"), None)
    return "\n\n".join(p for i, p in enumerate(unique) if i % 2 == parity)


def calibration_text() -> str:
    """Default calibration text (even-indexed pydoc topics)."""
    return _paragraphs(0)


def heldout_text() -> str:
    """Held-out evaluation text (odd-indexed pydoc topics), never used for calibration."""
    return _paragraphs(1)


def read_text_file(path: Path) -> str:
    from enginesmith.runtime.errors import BuildError

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BuildError(
            f"{path}: cannot read the text file ({exc}); pass a UTF-8 text file"
        ) from exc
    if len(text.strip()) < 100:
        raise BuildError(
            f"{path}: too little text ({len(text)} characters); pass at least a paragraph"
        )
    return text


def engine_logits(session: Any, ids: list[int], slot: int = 0) -> np.ndarray:
    """Logits [len(ids), vocab] of an OrtCpuExecutor for every position (chunked prefill)."""
    out = []
    for start in range(0, len(ids), EVAL_CHUNK):
        chunk = ids[start : start + EVAL_CHUNK]
        n = len(chunk)
        out.append(
            session.step(
                slot,
                np.array([chunk], np.int64),
                np.arange(start, start + n, dtype=np.int64)[None],
                np.array([start + n - 1], np.int32),
                np.array([n], np.int32),
                np.arange(n, dtype=np.int64),
            )
        )
    return np.concatenate(out)


def reference_logits(model: Any, ids: list[int]) -> np.ndarray:
    """Logits [len(ids), vocab] of the transformers model (fp32) on IDS."""
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    """exp(mean negative log-likelihood of ids[1:] given the logits at positions [:-1])."""
    logits = logits[:-1].astype(np.float64)
    targets = np.asarray(ids[1:])
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=-1))
    nll = log_norm - shifted[np.arange(len(targets)), targets]
    return float(math.exp(nll.mean()))


@dataclass
class QualityReport:
    tokens: int
    perplexity_reference: float
    perplexity_engine: float
    top1_agreement: float  # fraction of positions where the engine's argmax == reference argmax

    @property
    def perplexity_delta(self) -> float:
        return self.perplexity_engine - self.perplexity_reference

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "perplexity_delta": self.perplexity_delta}

    def summary(self) -> str:
        return (
            f"perplexity {self.perplexity_reference:.3f} -> {self.perplexity_engine:.3f} "
            f"({self.perplexity_delta:+.3f}) on {self.tokens} held-out tokens; "
            f"top-1 agreement with fp32 {self.top1_agreement:.3f}"
        )


def evaluate_engine(
    session: Any,
    reference_model: Any,
    tokenizer: Any,
    num_tokens: int = 1024,
    text: str | None = None,
) -> QualityReport:
    """Compare SESSION (a built engine) with REFERENCE_MODEL on NUM_TOKENS of held-out text."""
    ids = tokenizer(text or heldout_text()).input_ids[:num_tokens]
    ref = reference_logits_chunked(reference_model, ids)
    ours = engine_logits(session, ids)
    return QualityReport(
        tokens=len(ids),
        perplexity_reference=perplexity(ref, ids),
        perplexity_engine=perplexity(ours, ids),
        top1_agreement=float((ref.argmax(-1) == ours.argmax(-1)).mean()),
    )


def reference_logits_chunked(model: Any, ids: list[int]) -> np.ndarray:
    """Reference logits with the same chunking (and KV cache) as engine_logits."""
    import torch
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=model.config)
    out = []
    with torch.no_grad():
        for start in range(0, len(ids), EVAL_CHUNK):
            chunk = torch.tensor([ids[start : start + EVAL_CHUNK]])
            result = model(chunk, past_key_values=cache, use_cache=True)
            out.append(result.logits[0].float().numpy())
    return np.concatenate(out)
