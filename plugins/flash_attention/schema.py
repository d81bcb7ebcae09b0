"""The FlashAttention plugin op: the single schema shared by the fusion pass, every backend
lowering and the NumPy reference.

One node per decoder layer: causal (optionally sliding-window) grouped-query attention over an
in-place KV cache of fixed capacity. Rows of a call are cache *slots*; each row carries its own
lengths, so one call can mix prefill chunks, single-token decode, multi-token verification and
idle rows. Semantics follow ONNX Runtime's GroupQueryAttention with `query_seqlens`:

  T[b] = seqlens_k[b] + 1     tokens in slot b's cache after the call
  Q[b] = query_seqlens[b]     valid (left-aligned, right-padded) new tokens in row b
  P[b] = T[b] - Q[b]          tokens cached before the call (rollback = pass a smaller P)

New K/V rows [0, Q) are written at cache positions [P, T); query row s sits at absolute position
P + s and attends to cache positions [max(0, P + s - W + 1), P + s], where W =
local_window_size (the number of positions attended, the query's own included; -1 = unbounded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DOMAIN = "ai.enginesmith"
OP_TYPE = "FlashAttention"
VERSION = 1

# Input order (names are documentation; positions are the contract).
INPUTS = (
    "query",  # [B, S, num_heads * head_dim]     float, rotary already applied
    "key",  # [B, S, kv_num_heads * head_dim]  float, rotary already applied
    "value",  # [B, S, kv_num_heads * head_dim]
    "cache_key",  # [B, kv_num_heads, MAX, head_dim] (BNSH), updated in place
    "cache_value",  # [B, kv_num_heads, MAX, head_dim]
    "seqlens_k",  # [B] int32: total tokens after the call - 1
    "query_seqlens",  # [B] int32: valid new tokens per row (0 = idle row)
)
OUTPUTS = (
    "output",  # [B, S, num_heads * head_dim]; rows >= Q[b] unspecified
    "cache_key_out",  # aliases cache_key when bound to the same buffer
    "cache_value_out",
)

# Graph inputs the fused engine gains (shared by all layers).
SEQLENS_K = "seqlens_k"
QUERY_SEQLENS = "query_seqlens"


@dataclass(frozen=True)
class FlashAttentionAttrs:
    """Attributes of one FlashAttention node."""

    num_heads: int
    kv_num_heads: int
    head_dim: int
    scale: float
    local_window_size: int = -1  # -1: full causal; else positions attended, self included

    def __post_init__(self) -> None:
        if self.num_heads % self.kv_num_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of kv_num_heads "
                f"({self.kv_num_heads}) [developer error]"
            )

    @classmethod
    def from_node_attributes(cls, attrs: dict[str, Any]) -> FlashAttentionAttrs:
        return cls(
            num_heads=int(attrs["num_heads"]),
            kv_num_heads=int(attrs["kv_num_heads"]),
            head_dim=int(attrs["head_dim"]),
            scale=float(attrs["scale"]),
            local_window_size=int(attrs.get("local_window_size", -1)),
        )

    def as_node_attributes(self) -> dict[str, int | float]:
        return {
            "num_heads": self.num_heads,
            "kv_num_heads": self.kv_num_heads,
            "head_dim": self.head_dim,
            "scale": self.scale,
            "local_window_size": self.local_window_size,
        }


def window_from_hf(sliding_window: int | None) -> int:
    """HF's `sliding_window` (key positions (q - W, q]) maps 1:1 onto local_window_size."""
    return -1 if not sliding_window else int(sliding_window)
