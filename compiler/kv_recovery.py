"""--kv-heads with a recovery step: collapse KV heads in the transformers model, then fit what
pooling lost on calibration text, within a wall-clock budget (capture included).

Which published conversion this follows:
- GQA (arXiv 2305.13245) mean-pools the K/V heads of a group, then *uptrains* the whole model on
  ~5% of its pre-training data. Pooling is done here the same way (and with the same groups as
  passes/collapse_kv_heads.py: contiguous, or AsymGQA's similarity grouping, arXiv 2406.14963).
- Uptraining is out of reach of a CPU build; the recovery is a short distillation in two stages
  on the calibration text (512-token segments):
  1. Layer by layer, on the first 2048 tokens (LAYERWISE_SHARE of the budget): each layer's
     attention block (q, k, v, o projections) is fitted by Adam so that, on the original model's
     inputs to that layer, its output matches the original attention output:
     min ||attn_collapsed(x) - attn_original(x)||^2.
     Cheap steps (one attention block), a good start; but each layer is fitted on the teacher's
     inputs, so the errors of all layers still add up.
  2. End to end (the rest): min KL(original || collapsed) over the next-token distribution, the
     attention projections of all layers trained together (gradient through the whole model),
     so later layers compensate what earlier ones still get wrong. Each step reads a fresh
     segment of the text after those 2048 tokens, its teacher computed then. On CPUs with
     native bf16 (AVX512-BF16, AMX) the passes run in bf16 autocast with a bf16 teacher and
     frozen weights, the trained projections kept fp32: 1.6-1.9 s a step instead of 2.8 (ad-hoc
     timing; bench-lossy: 62 steps in 114 s).
  Measured on SmolLM2-135M --kv-heads 1 (held-out perplexity on 1024 tokens, fp32 15.5, pooling
  alone 15884; 2 torch threads, 2-core machine): both stages, 4 min, ~24k tokens streamed: 31.7
  in scripts/bench-lossy, 29.8 in an ad-hoc run (1.92-2.04x fp32); the rest are ad-hoc runs
  (collapse_with_recovery, then quality.perplexity on the held-out text): 6 min: 40.7, although
  the check segment's KL kept falling (0.27 -> 0.21): held-out perplexity is not monotone in
  the budget. Variants at 4 min: end-to-end learning rate 1e-4: 31.6, 5e-4: 45.2, decaying
  linearly from 3e-4: 30.8; layer-wise share 0.3: 34.2; every decoder weight trained end to
  end: 46.3. bf16 end-to-end steps, ad-hoc runs within one hour as the host slowed: 31.6 and
  37.5 (learning rate decaying linearly from 3e-4), 38.3 (2e-4); fp32 there: 36.0 (decaying),
  39.5 (2e-4). A budget of minutes buys fewer steps on a slower host, and the result follows.
  Cycling the 2048 captured tokens instead (teacher log-probabilities stored) overfitted them:
  calibration KL 0.05 but 36.3 after 4 min, 34.1 after 8. Layer-wise fit alone: 42.0 after 4 min.
- Also tried: fitting layers in sequence on the *collapsed* model's own inputs (so later layers
  correct earlier drift). With the original's residual stream as the target, the target is
  dominated by the drift (100x the attention output from layer 12 on, nothing an attention block
  can fit); with the original's attention output as the target it reached 406 after 4 min (on a
  loaded machine), and each layer costs two extra passes over the calibration text. The
  end-to-end stage does that correction instead.
- Head alignment before merging (arXiv 2412.20677: rotate each head's K/V dimensions to align
  heads before pooling) is not done: with the query and output projections trainable, the fit
  can absorb a per-head rotation, and it starts from the plain mean.
Never worse than pooling: a layer whose fit raised its attention error is reset, the end-to-end
stage is undone if it raised the KL, and if the result's KL is above pooling's, pooling is kept.
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

CALIBRATION_TOKENS = 2048  # layer-wise stage and the KL check: captured once
SEGMENT_TOKENS = 512
# End-to-end stage: each step a fresh 512-token segment of calibration text, its teacher
# log-probabilities computed then (a forward pass, no gradient). Cycling the 2048 captured tokens
# overfitted them (calibration KL 0.05, held-out perplexity 34.1 after 8 min); the default text
# holds ~100k tokens, more than a budget of minutes consumes.
STREAM_TOKENS = 131072
# Layer-wise stage: Adam on the four projections of one layer. Measured on SmolLM2 --kv-heads 1
# with that stage alone (docs/benchmarks.md, "Lossy options"): held-out perplexity 1999 after
# 4 min at 1e-4, 54.7 after 4 min at 1e-3 (pooling alone: 15884, fp32: 15.5).
LEARNING_RATE = 1e-3
# Share of the budget left after capture for the layer-wise stage; the rest is end to end. At 0.5
# and 4 min the end-to-end stage made ~48 steps and took the check segment's KL 0.32 -> 0.27.
LAYERWISE_SHARE = 0.5
# Adam on all attention projections together, next-token KL (1e-4: 31.6, 5e-4: 45.2 at 4 min)
E2E_LEARNING_RATE = 2e-4
# bf16 autocast where the CPU has it natively (_native_bf16): 1.6-1.9 s per end-to-end step
# instead of 2.8 (2 threads, AMX host; ad-hoc timing).
E2E_BF16 = True  # False: fp32 steps everywhere (tests run both paths)
# --kv-recovery-minutes default: 29.8-31.7 held-out perplexity at 4 min on SmolLM2 (fp32 15.5), 31.5
# with bf16 steps (scripts/bench-lossy); 36-40 on a slow host.
DEFAULT_MINUTES = 4.0

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
    stream_tokens: int = 0  # calibration tokens the end-to-end stage went through
    # per layer: relative error ||attn' - attn|| / ||attn|| on calibration tokens
    error_pooled: list[float] = field(default_factory=list)
    error_recovered: list[float] = field(default_factory=list)
    # KL(original || collapsed) per token on the first calibration segment: pooled, after the
    # layer fits, after the end-to-end distillation (NaN where not measured: minutes = 0)
    kl_pooled: float = float("nan")
    kl_layers: float = float("nan")
    kl_recovered: float = float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {
            "kv_heads_before": self.kv_heads_before,
            "kv_heads_after": self.kv_heads_after,
            "grouping": self.grouping,
            "minutes_budget": self.minutes_budget,
            "seconds": round(self.seconds, 1),
            "steps": self.steps,
            "calibration_tokens": self.tokens,
            "end_to_end_tokens": self.stream_tokens,
            "mean_error_pooled": round(float(np.mean(self.error_pooled)), 4),
            "mean_error_recovered": round(float(np.mean(self.error_recovered)), 4),
            "kl_pooled": _rounded(self.kl_pooled),
            "kl_after_layer_fits": _rounded(self.kl_layers),
            "kl_recovered": _rounded(self.kl_recovered),
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


def _rounded(value: float) -> float | None:
    return None if np.isnan(value) else round(value, 4)


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


def _capture(model: Any, segments: list[Any]) -> tuple[list[dict[str, Any]], Any]:
    """Per layer, per segment: the attention block's inputs (normed hidden states, position
    embeddings) and its output in the original model; and the original's next-token
    log-probabilities on the first segment (the KL check: the only one that needs the LM head)."""
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
            logits = model(input_ids=segments[0], use_cache=False).logits[0]
            check_teacher = torch.log_softmax(logits.float(), dim=-1)
            for segment in segments[1:]:
                model.model(input_ids=segment, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return records, check_teacher


def _relative_error(attn: Any, record: dict[str, Any]) -> float:
    import torch

    num = den = 0.0
    with torch.no_grad():
        for x, pos, y in zip(record["x"], record["pos"], record["y"], strict=True):
            out = attn(hidden_states=x, position_embeddings=pos, attention_mask=None)[0]
            num += float((out - y).pow(2).sum())
            den += float(y.pow(2).sum())
    return (num / max(den, 1e-30)) ** 0.5


def _kl(student_logits: Any, teacher_logp: Any) -> Any:
    """KL(teacher || student) per token, averaged."""
    import torch

    logp = torch.log_softmax(student_logits.float(), dim=-1)
    return (teacher_logp.exp() * (teacher_logp - logp)).sum(-1).mean()


def _mean_kl(model: Any, segments: list[Any], teacher: list[Any]) -> float:
    import torch

    with torch.no_grad():
        return float(
            np.mean(
                [
                    float(_kl(model(input_ids=s, use_cache=False).logits[0], t))
                    for s, t in zip(segments, teacher, strict=True)
                ]
            )
        )


def _fit_layers(
    modules: list[Any],
    records: list[dict[str, Any]],
    end: float,
    minimum_one_step: bool,
    report: RecoveryReport,
    log: Log,
    learning_rate: float,
) -> None:
    """Fit each attention block to the original's output on the original's inputs, until END
    (shared evenly among the layers not fitted yet); a layer that got worse is reset."""
    import torch

    for i, (attn, record) in enumerate(zip(modules, records, strict=True)):
        report.error_pooled.append(_relative_error(attn, record))
        params = list(attn.parameters())
        pooled = [p.detach().clone() for p in params]
        start = time.perf_counter()
        budget = (end - start) / (len(modules) - i)
        if budget > 0 or minimum_one_step:
            for p in params:
                p.requires_grad_(True)
            optimizer = torch.optim.Adam(params, lr=learning_rate)
            step = 0
            segments = len(record["x"])
            while step == 0 or time.perf_counter() - start < budget:
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


def _native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): there, bf16 autocast
    makes an end-to-end step ~1.7x faster; elsewhere it would be slower than fp32."""
    import torch

    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def _bf16_twins(original: Any, collapsed: Any) -> tuple[Any, Any]:
    """bf16 copies of ORIGINAL (the teacher) and COLLAPSED (the student) whose attention
    projections are COLLAPSED's own fp32 modules: training the student trains COLLAPSED, and the
    frozen rest is cast once instead of at every autocast call."""
    import torch

    teacher = copy.deepcopy(original).to(torch.bfloat16)
    student = copy.deepcopy(collapsed).to(torch.bfloat16)
    pairs = zip(
        kv_calibration.attention_modules(student),
        kv_calibration.attention_modules(collapsed),
        strict=True,
    )
    for bf16_attn, fp32_attn in pairs:
        for name, child in fp32_attn.named_children():
            setattr(bf16_attn, name, child)
    return teacher, student


def _distill(
    original: Any,
    collapsed: Any,
    stream: list[Any],
    check: list[Any],
    check_teachers: list[Any],
    deadline: float,
    report: RecoveryReport,
    log: Log,
) -> None:
    """End to end: minimise KL(original || collapsed) on STREAM's segments in turn (each one's
    teacher computed when it comes up), training the attention projections of every layer,
    until DEADLINE; reset if the KL on CHECK did not go down. On a CPU with native bf16 the
    forward and backward passes run in bf16 autocast (the trained weights stay fp32)."""
    import torch

    params = [p for m in kv_calibration.attention_modules(collapsed) for p in m.parameters()]
    start = time.perf_counter()
    before = report.kl_layers = _mean_kl(collapsed, check, check_teachers)
    forward = time.perf_counter() - start
    if time.perf_counter() + 5 * forward >= deadline:  # one step costs about four forwards
        return
    saved = [p.detach().clone() for p in params]
    bf16 = E2E_BF16 and _native_bf16()
    teacher, student = _bf16_twins(original, collapsed) if bf16 else (original, collapsed)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    optimizer = torch.optim.Adam(params, lr=E2E_LEARNING_RATE)
    for p in params:
        p.requires_grad_(True)
    step = 0
    step_seconds = 4 * forward
    while time.perf_counter() + step_seconds + forward < deadline:
        t0 = time.perf_counter()
        segment = stream[step % len(stream)]
        with autocast:
            with torch.no_grad():
                logits = teacher(input_ids=segment, use_cache=False).logits[0]
                target = torch.log_softmax(logits.float(), -1)
            loss = _kl(student(input_ids=segment, use_cache=False).logits[0], target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        step_seconds = max(step_seconds * 0.5, time.perf_counter() - t0)
    del teacher, student
    for p in params:
        p.requires_grad_(False)
    report.steps += step
    report.stream_tokens = step * SEGMENT_TOKENS
    after = _mean_kl(collapsed, check, check_teachers)
    if after > before:
        with torch.no_grad():
            for p, old in zip(params, saved, strict=True):
                p.copy_(old)
        after = before
    report.kl_recovered = after
    log(
        f"      end to end: KL {before:.3f} -> {after:.3f} "
        f"({step} steps{', bf16' if bf16 else ''}, {time.perf_counter() - start:.0f} s)"
    )


def _segments(ids: list[int]) -> list[Any]:
    import torch

    return [torch.tensor([ids[s : s + SEGMENT_TOKENS]]) for s in range(0, len(ids), SEGMENT_TOKENS)]


def recover(
    original: Any,
    collapsed: Any,
    ids: list[int],
    minutes: float,
    report: RecoveryReport,
    log: Log,
    learning_rate: float | None = None,
    deadline: float | None = None,
    stream_ids: list[int] | None = None,
) -> None:
    """Fit the collapsed model to the original (in place): each layer's attention block on its
    own (on IDS), then the whole model end to end (on STREAM_IDS, default IDS); all of it by
    DEADLINE (default: MINUTES from now)."""
    import torch

    start = time.perf_counter()
    deadline = deadline if deadline is not None else start + minutes * 60.0
    segments = _segments(ids)
    records, check_teacher = _capture(original, segments)
    modules = kv_calibration.attention_modules(collapsed)
    params = [p for m in modules for p in m.parameters()]
    pooled = [p.detach().clone() for p in params]
    check, check_teachers = segments[:1], [check_teacher]
    if minutes > 0:
        report.kl_pooled = _mean_kl(collapsed, check, check_teachers)
    now = time.perf_counter()
    _fit_layers(
        modules,
        records,
        now + (deadline - now) * LAYERWISE_SHARE,
        minutes > 0,
        report,
        log,
        learning_rate or LEARNING_RATE,
    )
    del records
    if minutes <= 0:
        return
    stream = _segments(stream_ids) if stream_ids else segments
    # whole segments only: a short tail would weigh as much as a full one in a step
    stream = [s for s in stream if s.shape[1] == SEGMENT_TOKENS] or segments
    _distill(original, collapsed, stream, check, check_teachers, deadline, report, log)
    if np.isnan(report.kl_recovered):  # no time was left for the distillation
        report.kl_recovered = report.kl_layers = _mean_kl(collapsed, check, check_teachers)
    if report.kl_recovered > report.kl_pooled:  # never worse than pooling, overall
        with torch.no_grad():
            for p, before in zip(params, pooled, strict=True):
                p.copy_(before)
        report.kl_recovered = report.kl_pooled
        report.error_recovered = list(report.error_pooled)
        log("      recovery did not lower the KL: pooled weights kept")


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
    """MODEL collapsed to TARGET KV heads, then recovered within MINUTES of wall-clock time,
    capture included (0 = pooling only). LEARNING_RATE overrides the layer-wise stage's. MODEL
    itself is left unchanged (it stays the build's fp32 reference)."""
    import torch

    start = time.perf_counter()
    kv_heads = model.config.num_key_value_heads or model.config.num_attention_heads
    text, source = kv_calibration.calibration_source(calibration)
    all_ids = tokenizer(text).input_ids[: CALIBRATION_TOKENS + STREAM_TOKENS]
    ids = all_ids[:CALIBRATION_TOKENS]
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
        recover(
            model,
            collapsed,
            ids,
            minutes,
            report,
            log,
            learning_rate,
            start + minutes * 60.0,
            # the end-to-end stage reads past the captured tokens (their KL is the check)
            all_ids[CALIBRATION_TOKENS:],
        )
    report.seconds = time.perf_counter() - start
    return collapsed, report
