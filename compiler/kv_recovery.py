"""--kv-heads with a recovery step: collapse KV heads in the transformers model, then fit what
pooling lost, layer by layer, on calibration text, within a CPU time budget.

Which published conversion this follows:
- GQA (arXiv 2305.13245) mean-pools the K/V heads of a group, then *uptrains* the whole model on
  ~5% of its pre-training data. Pooling is done here the same way (and with the same groups as
  passes/collapse_kv_heads.py: contiguous, or AsymGQA's similarity grouping, arXiv 2406.14963).
- Uptraining is out of reach of a CPU build, so the recovery is *local*: each layer's attention
  block (its q, k, v and o projections) is fitted by gradient descent so that, on the original
  model's inputs to that layer (calibration text), its output matches the original attention
  output: min ||attn_collapsed(x) - attn_original(x)||^2. This is layer-wise distillation, the
  cheap end of uptraining; every layer is fitted independently on the teacher's inputs.
- Head alignment before merging (arXiv 2412.20677: rotate each head's K/V dimensions to align
  heads before pooling) is not done: with the query and output projections trainable, the fit
  can absorb a per-head rotation, and it starts from the plain mean.
The result is a transformers model with fewer KV heads that the build exports instead of the
original; the ONNX collapse pass then has nothing left to pool.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from enginesmith.compiler import kv_calibration
from enginesmith.passes.collapse_kv_heads import (
    Groups,
    contiguous_groups,
    query_permutation,
    similarity_groups,
    similarity_matrix,
)
from enginesmith.runtime.errors import BuildError

CALIBRATION_TOKENS = 2048
SEGMENT_TOKENS = 512
# Adam on the four projections of one layer. Measured on SmolLM2 --kv-heads 1 (docs/benchmarks.md,
# "Lossy options"): held-out perplexity 1999 after 4 min at 1e-4, 259 after 1 min and 54.7 after
# 4 min at 1e-3 (pooling alone: 15884, fp32: 15.5).
LEARNING_RATE = 1e-3
DEFAULT_MINUTES = 4.0  # --kv-recovery-minutes default (measured trade-off, docs/benchmarks.md)

Log = Callable[[str], None]


@dataclass
class RecoveryReport:
    kv_heads_before: int
    kv_heads_after: int
    grouping: str
    minutes_budget: float
    seconds: float = 0.0
    steps: int = 0
    tokens: int = 0
    # per layer: relative error ||attn' - attn|| / ||attn|| on calibration tokens
    error_pooled: list[float] = field(default_factory=list)
    error_recovered: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kv_heads_before": self.kv_heads_before,
            "kv_heads_after": self.kv_heads_after,
            "grouping": self.grouping,
            "minutes_budget": self.minutes_budget,
            "seconds": round(self.seconds, 1),
            "steps": self.steps,
            "calibration_tokens": self.tokens,
            "mean_error_pooled": round(float(np.mean(self.error_pooled)), 4),
            "mean_error_recovered": round(float(np.mean(self.error_recovered)), 4),
            "per_layer_error_pooled": [round(e, 4) for e in self.error_pooled],
            "per_layer_error_recovered": [round(e, 4) for e in self.error_recovered],
        }

    def summary(self) -> str:
        d = self.as_dict()
        return (
            f"{self.kv_heads_before} -> {self.kv_heads_after} KV heads; attention error "
            f"{d['mean_error_pooled']:.3f} pooled -> {d['mean_error_recovered']:.3f} recovered "
            f"({self.steps} steps, {self.seconds:.0f} s)"
        )


def _groups(
    model: Any, tokenizer: Any, target: int, grouping: str, calibration: Path | None
) -> list[Groups]:
    layers = len(kv_calibration.attention_modules(model))
    kv_heads = model.config.num_key_value_heads or model.config.num_attention_heads
    if grouping == "contiguous":
        return [contiguous_groups(kv_heads, target)] * layers
    stats = kv_calibration.collect_head_stats(model, tokenizer, calibration)
    return [
        similarity_groups(similarity_matrix(stats.key_gram[i], stats.value_gram[i]), target)
        for i in range(layers)
    ]


def collapsed_model(model: Any, groups: list[Groups], target: int) -> Any:
    """A copy of MODEL with TARGET KV heads: each group's K/V projection rows mean-pooled (and
    the query heads / output-projection columns permuted so that groups are contiguous)."""
    import torch

    config = copy.deepcopy(model.config)
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    config.num_key_value_heads = target
    new = type(model)(config)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i, layer_groups in enumerate(groups):
        prefix = f"model.layers.{i}.self_attn."
        perm = query_permutation(layer_groups, heads, kv_heads)
        rows = torch.tensor([h * head_dim + d for h in perm for d in range(head_dim)])
        state[prefix + "q_proj.weight"] = state[prefix + "q_proj.weight"][rows]
        if prefix + "q_proj.bias" in state:
            state[prefix + "q_proj.bias"] = state[prefix + "q_proj.bias"][rows]
        state[prefix + "o_proj.weight"] = state[prefix + "o_proj.weight"][:, rows]
        for kind in ("k_proj", "v_proj"):
            for part in ("weight", "bias"):
                key = f"{prefix}{kind}.{part}"
                if key not in state:
                    continue
                by_head = state[key].reshape(kv_heads, head_dim, *state[key].shape[1:])
                pooled = torch.stack([by_head[g].mean(dim=0) for g in layer_groups])
                state[key] = pooled.reshape(target * head_dim, *state[key].shape[1:])
    new.load_state_dict(state)
    new.eval()
    if hasattr(model, "generation_config"):
        new.generation_config = model.generation_config
    return new


def _capture(model: Any, ids: list[int]) -> list[dict[str, Any]]:
    """Per layer, per segment: the attention block's inputs (normed hidden states, position
    embeddings) and its output in the original model."""
    import torch

    modules = kv_calibration.attention_modules(model)
    records: list[dict[str, Any]] = [{"x": [], "pos": [], "y": []} for _ in modules]

    def hook(i: int) -> Any:
        def fn(_m: Any, args: Any, kwargs: Any, output: Any) -> None:
            x = kwargs.get("hidden_states", args[0] if args else None)
            records[i]["x"].append(x.detach())
            records[i]["pos"].append(tuple(t.detach() for t in kwargs["position_embeddings"]))
            records[i]["y"].append(output[0].detach())

        return fn

    handles = [m.register_forward_hook(hook(i), with_kwargs=True) for i, m in enumerate(modules)]
    try:
        with torch.no_grad():
            for s in range(0, len(ids), SEGMENT_TOKENS):
                model.model(input_ids=torch.tensor([ids[s : s + SEGMENT_TOKENS]]), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return records


def _relative_error(attn: Any, record: dict[str, Any]) -> float:
    import torch

    num = den = 0.0
    with torch.no_grad():
        for x, pos, y in zip(record["x"], record["pos"], record["y"], strict=True):
            out = attn(hidden_states=x, position_embeddings=pos, attention_mask=None)[0]
            num += float((out - y).pow(2).sum())
            den += float(y.pow(2).sum())
    return (num / max(den, 1e-30)) ** 0.5


def recover(
    original: Any,
    collapsed: Any,
    ids: list[int],
    minutes: float,
    report: RecoveryReport,
    log: Log,
    learning_rate: float | None = None,
) -> None:
    """Fit each collapsed layer's attention block to the original's output (in place)."""
    import torch

    records = _capture(original, ids)
    modules = kv_calibration.attention_modules(collapsed)
    budget = minutes * 60.0 / len(modules)
    for i, (attn, record) in enumerate(zip(modules, records, strict=True)):
        report.error_pooled.append(_relative_error(attn, record))
        params = list(attn.parameters())
        pooled = [p.detach().clone() for p in params]
        start = time.perf_counter()
        if budget > 0:
            for p in params:
                p.requires_grad_(True)
            optimizer = torch.optim.Adam(params, lr=learning_rate or LEARNING_RATE)
            step = 0
            segments = len(record["x"])
            while time.perf_counter() - start < budget:
                j = step % segments
                out = attn(
                    hidden_states=record["x"][j],
                    position_embeddings=record["pos"][j],
                    attention_mask=None,
                )[0]
                target = record["y"][j]
                loss = (out - target).pow(2).mean() / target.pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
            report.steps += step
            for p in params:
                p.requires_grad_(False)
        error = _relative_error(attn, record)
        if error > report.error_pooled[-1]:  # never worse than pooling on the calibration text
            with torch.no_grad():
                for p, before in zip(params, pooled, strict=True):
                    p.copy_(before)
            error = report.error_pooled[-1]
        report.error_recovered.append(error)
        log(
            f"      layer {i:2d}: attention error {report.error_pooled[-1]:.3f} pooled -> "
            f"{report.error_recovered[-1]:.3f}"
        )


def collapse_with_recovery(
    model: Any,
    tokenizer: Any,
    target: int,
    grouping: str = "contiguous",
    calibration: Path | None = None,
    minutes: float = DEFAULT_MINUTES,
    log: Log = print,
    learning_rate: float | None = None,
) -> tuple[Any, RecoveryReport]:
    """MODEL collapsed to TARGET KV heads, then recovered for MINUTES of CPU time (0 = pooling
    only). MODEL itself is left unchanged (it stays the build's fp32 reference)."""
    import torch

    start = time.perf_counter()
    kv_heads = model.config.num_key_value_heads or model.config.num_attention_heads
    text, source = kv_calibration.calibration_source(calibration)
    ids = tokenizer(text).input_ids[:CALIBRATION_TOKENS]
    if len(ids) < 16:
        raise BuildError(
            f"calibration text {source} has only {len(ids)} tokens; pass a longer --calibration"
        )
    groups = _groups(model, tokenizer, target, grouping, calibration)
    collapsed = collapsed_model(model, groups, target)
    for p in collapsed.parameters():
        p.requires_grad_(False)
    report = RecoveryReport(kv_heads, target, grouping, minutes, tokens=len(ids))
    with torch.enable_grad():
        recover(model, collapsed, ids, minutes, report, log, learning_rate)
    report.seconds = time.perf_counter() - start
    return collapsed, report
