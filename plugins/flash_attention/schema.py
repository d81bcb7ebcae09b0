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

Optional parts (absent inputs are empty names):
- packed QKV: `key` and `value` absent, `query` is [B, S, (num_heads + 2 * kv_num_heads) *
  head_dim] holding Q, K, V side by side (one projection MatMul feeds the op).
- rotary (attribute rotary = 1): `cos_cache` / `sin_cache` [max_positions, rotary_dim / 2]
  tables; Q and K rows are rotated at their absolute position P + s before attention and before
  K is written to the cache. The position is the cache position, so the runtime must feed
  position_ids == cache positions (enginesmith's runtime always does). rotary_interleaved = 0
  rotates the halves (x[:d/2], x[d/2:]) (HF's rotate_half), 1 rotates pairs (x[2i], x[2i+1]).
  Dimensions past rotary_dim are left as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DOMAIN = "ai.enginesmith"
OP_TYPE = "FlashAttention"
VERSION = 1

# Input order (names are documentation; positions are the contract).
INPUTS = (
    "query",  # [B, S, num_heads * head_dim] (or packed QKV, see above)
    "key",  # [B, S, kv_num_heads * head_dim]; absent when query is packed
    "value",  # [B, S, kv_num_heads * head_dim]; absent when query is packed
    "cache_key",  # [B, kv_num_heads, MAX, head_dim] (BNSH), updated in place
    "cache_value",  # [B, kv_num_heads, MAX, head_dim]
    "seqlens_k",  # [B] int32: total tokens after the call - 1
    "query_seqlens",  # [B] int32: valid new tokens per row (0 = idle row)
    "cos_cache",  # [max_positions, rotary_dim / 2]; only with rotary = 1
    "sin_cache",  # [max_positions, rotary_dim / 2]; only with rotary = 1
)
REQUIRED_INPUTS = 7  # query .. query_seqlens (key/value may be empty when packed)
COS_CACHE, SIN_CACHE = 7, 8
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
    rotary: int = 0  # 1: rotate Q and K with cos_cache / sin_cache (inputs 7, 8)
    rotary_interleaved: int = 0

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
            rotary=int(attrs.get("rotary", 0)),
            rotary_interleaved=int(attrs.get("rotary_interleaved", 0)),
        )

    def as_node_attributes(self) -> dict[str, int | float]:
        return {
            "num_heads": self.num_heads,
            "kv_num_heads": self.kv_num_heads,
            "head_dim": self.head_dim,
            "scale": self.scale,
            "local_window_size": self.local_window_size,
            "rotary": self.rotary,
            "rotary_interleaved": self.rotary_interleaved,
        }

    @property
    def packed_width(self) -> int:
        """Last dimension of a packed QKV query."""
        return (self.num_heads + 2 * self.kv_num_heads) * self.head_dim


def window_from_hf(sliding_window: int | None) -> int:
    """HF's `sliding_window` (key positions (q - W, q]) maps 1:1 onto local_window_size."""
    return -1 if not sliding_window else int(sliding_window)
