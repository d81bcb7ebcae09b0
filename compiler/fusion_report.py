"""The fusion report: per rule, how many layers it covered out of how many it should have, and
for the layers it missed, the reason the pass gave (its nearest partial match).

Built from the pass records of one pipeline run; printed by build-engine and stored in
build_report.json under "fusion". A missing attention fusion is always a build error (the
in-place KV cache needs every layer fused); the other rules only cost speed, so a shortfall is a
warning unless --strict-fusion is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from enginesmith.compiler.pipeline import PassRecord
from enginesmith.runtime.errors import BuildError


@dataclass
class RuleCoverage:
    """One fusion rule: what it covered, what it should cover, why it missed the rest."""

    rule: str
    covered: list[int]
    expected: int
    failures: dict[str, str] = field(default_factory=dict)
    required: bool = False  # a shortfall is always an error

    @property
    def complete(self) -> bool:
        return len(self.covered) >= self.expected

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": len(self.covered),
            "expected": self.expected,
            "layers": self.covered,
            "failures": self.failures,
        }


# pass name -> (rule label, report key holding the covered layers, required)
_LAYER_RULES = {
    "fuse-attention": ("attention -> FlashAttention", "fused_layers", True),
    "fuse-rotary": ("rotary -> FlashAttention", "fused_layers", False),
    "pack-qkv": ("Q/K/V projection packing", "packed_layers", False),
    "pack-gate-up": ("gate/up projection packing", "packed_layers", False),
}


def coverage(records: list[PassRecord], num_layers: int) -> list[RuleCoverage]:
    """The coverage of every fusion rule that ran, in pipeline order."""
    rules: list[RuleCoverage] = []
    for record in records:
        if record.name in _LAYER_RULES:
            label, key, required = _LAYER_RULES[record.name]
            rules.append(
                RuleCoverage(
                    label,
                    list(record.report.get(key, [])),
                    num_layers,
                    dict(record.report.get("failures", {})),
                    required,
                )
            )
        elif record.name == "fuse-rmsnorm":
            norms = record.report["norm_layers"]
            plain = norms["SimplifiedLayerNormalization"]
            skip = norms["SkipSimplifiedLayerNormalization"]
            left = record.report.get("unfused_rmsnorm", [])
            # Two norms per layer plus the final one; all but the first read a residual sum.
            rules.append(
                RuleCoverage(
                    "RMSNorm (fused kernel)",
                    sorted(plain + skip),
                    2 * num_layers + 1,
                    {name: "RMSNormalization left as is" for name in left},
                )
            )
            rules.append(
                RuleCoverage(
                    "residual add + RMSNorm",
                    sorted(skip),
                    2 * num_layers,
                    {} if len(skip) >= 2 * num_layers else {"norms": "Add not fused (see pass)"},
                )
            )
    return rules


def format_report(rules: list[RuleCoverage]) -> list[str]:
    """Console lines: one per rule, plus one per missed layer with its reason."""
    lines = ["      fusion report (covered / expected):"]
    for r in rules:
        mark = "ok" if r.complete else "MISSING"
        lines.append(f"        {r.rule:<30} {len(r.covered):>4} / {r.expected:<4} {mark}")
        for where, why in r.failures.items():
            lines.append(f"          {where}: {why}")
    return lines


def check(rules: list[RuleCoverage], strict: bool) -> list[str]:
    """Raise BuildError for a required rule's shortfall (any rule's with STRICT); return one
    warning line per other shortfall."""
    errors: list[str] = []
    warnings: list[str] = []
    for r in rules:
        if r.complete:
            continue
        missed = "; ".join(f"{k}: {v}" for k, v in r.failures.items()) or "no reason given"
        line = f"{r.rule}: {len(r.covered)} of {r.expected} ({missed})"
        (errors if r.required or strict else warnings).append(line)
    if errors:
        hint = (
            "the onnxruntime backend's in-place KV cache needs every layer fused"
            if any(r.required and not r.complete for r in rules)
            else "rebuild without --strict-fusion to accept the slower engine"
        )
        raise BuildError(
            "fusion incomplete: " + " | ".join(errors) + f"; {hint}; report this export form "
            "with the model's config.json"
        )
    return [f"      warning: {w} (--strict-fusion makes this an error)" for w in warnings]
