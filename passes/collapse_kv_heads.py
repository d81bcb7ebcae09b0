"""Collapse each layer's KV heads: H_kv -> N by mean-pooling the K and V projections of a group.

GQA (arXiv 2305.13245) converts a multi-head checkpoint by mean-pooling the key and value heads
of each group of H_kv / N heads. Which heads share a group matters (AsymGQA, arXiv 2406.14963):

* ``contiguous``: heads [g*s, (g+1)*s) form group g (s = H_kv / N), the paper's choice;
* ``similarity``: per layer, the partition into groups of s heads that loses the least when
  pooled, measured on calibration activations (``HeadStats``, see compiler/kv_calibration.py).

Mean-pooling a group of heads replaces each head's activation x_h by the group mean; the
squared error summed over the group is sum_h G_hh - (1/s) * sum_{a,b in g} G_ab, where G is the
Gram matrix of the heads' activations over the calibration tokens. So G is all the statistics
grouping needs: the similarity grouping maximizes the within-group sum of G (keys and values
each normalized by their trace), which is exactly minimizing the pooled reconstruction error of
K and V. Rotary embedding rotates every head of a token by the same angle, so G is the same
before and after it.

Rewritten, per FlashAttention node (the backend-neutral plugin op, before lowering):

    x -> MatMul(W_k [hidden, H_kv*D]) [-> Add(b_k)] -> Reshape [B,S,H_kv,D] -> ... -> key
becomes
    x -> MatMul(W_k' [hidden, N*D]) [-> Add(b_k')] -> Reshape [B,S,N,D] -> ... -> key

(same for values), the node's kv_num_heads and the cache inputs/outputs become N. GQA maps
query head q to KV head q // (H / N); a non-contiguous group is made contiguous by permuting
the query heads (columns of W_q and b_q) and the rows of the output projection W_o the same
way, which leaves the attention output unchanged (every op between is per head).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from enginesmith.passes.base import EnginePass, PassError
from enginesmith.plugins.flash_attention import schema

GROUPINGS = ("contiguous", "similarity")
# Ops between a projection and the attention input that act on every head the same way.
_CHAIN_OPS = ("Reshape", "Transpose", "Identity", "RotaryEmbedding")
_OUT_CHAIN_OPS = ("Reshape", "Transpose", "Identity")
# Above this many partitions the similarity grouping uses swap-based local search.
EXHAUSTIVE_LIMIT = 50_000

Groups = list[list[int]]


# --- pure grouping math -------------------------------------------------------------------------


def allowed_kv_heads(num_kv_heads: int) -> list[int]:
    """Targets --kv-heads accepts for a model with NUM_KV_HEADS: its divisors."""
    return [d for d in range(1, num_kv_heads + 1) if num_kv_heads % d == 0]


def check_target(target: int, num_heads: int, num_kv_heads: int) -> None:
    """Raise a one-line PassError when TARGET KV heads cannot be made from NUM_KV_HEADS."""
    choices = ", ".join(str(d) for d in allowed_kv_heads(num_kv_heads))
    if target < 1 or target > num_kv_heads:
        raise PassError(
            f"--kv-heads {target} is not below the model's {num_kv_heads} KV heads: collapsing "
            f"can only remove heads; choose one of {choices} ({num_kv_heads} keeps the model as is)"
        )
    if num_kv_heads % target:
        raise PassError(
            f"--kv-heads {target} does not divide the model's {num_kv_heads} KV heads "
            f"({num_heads} query heads); choose one of {choices}"
        )


def contiguous_groups(num_kv_heads: int, target: int) -> Groups:
    size = num_kv_heads // target
    return [list(range(g * size, (g + 1) * size)) for g in range(target)]


def canonical(groups: Groups) -> Groups:
    """Each group sorted, groups ordered by their first head."""
    return sorted((sorted(int(h) for h in g) for g in groups), key=lambda g: g[0])


def is_contiguous(groups: Groups) -> bool:
    return [h for g in groups for h in g] == list(range(sum(len(g) for g in groups)))


def pooling_error(gram: np.ndarray, groups: Groups) -> float:
    """Relative squared error of replacing every head's activation by its group mean.

    GRAM[a, b] = sum over tokens of <x_a, x_b>. Returns sum ||x_h - mean_g||^2 / sum ||x_h||^2.
    """
    gram = np.asarray(gram, np.float64)
    total = float(np.trace(gram))
    if total <= 0:
        return 0.0
    kept = sum(float(gram[np.ix_(g, g)].sum()) / len(g) for g in groups)
    return max(0.0, (total - kept) / total)


def similarity_matrix(key_gram: np.ndarray, value_gram: np.ndarray) -> np.ndarray:
    """Head similarity of one layer: K and V Gram matrices, each normalized by its trace."""
    out = np.zeros_like(np.asarray(key_gram, np.float64))
    for gram in (key_gram, value_gram):
        gram = np.asarray(gram, np.float64)
        trace = float(np.trace(gram))
        if trace > 0:
            out += gram / trace
    return out


def _score(similarity: np.ndarray, groups: Groups) -> float:
    return sum(float(similarity[np.ix_(g, g)].sum()) for g in groups)


def _partitions(items: list[int], size: int) -> Any:
    """Every partition of ITEMS into groups of SIZE (the contiguous one first)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for combo in itertools.combinations(rest, size - 1):
        chosen = set(combo)
        remaining = [x for x in rest if x not in chosen]
        for tail in _partitions(remaining, size):
            yield [[first, *combo], *tail]


def partition_count(num_kv_heads: int, target: int) -> int:
    size = num_kv_heads // target
    return math.factorial(num_kv_heads) // (math.factorial(size) ** target * math.factorial(target))


def similarity_groups(similarity: np.ndarray, target: int) -> Groups:
    """The partition of the heads into TARGET equal groups with the largest within-group
    similarity (exhaustive when small, else pairwise-swap local search from contiguous).
    Ties keep the contiguous grouping."""
    n = similarity.shape[0]
    size = n // target
    best = contiguous_groups(n, target)
    best_score = _score(similarity, best)
    tol = 1e-12 * max(1.0, abs(best_score))
    if size == 1 or target == 1:
        return best
    if partition_count(n, target) <= EXHAUSTIVE_LIMIT:
        for groups in _partitions(list(range(n)), size):
            score = _score(similarity, groups)
            if score > best_score + tol:
                best, best_score = groups, score
        return canonical(best)
    improved = True
    while improved:
        improved = False
        for gi, gj in itertools.combinations(range(target), 2):
            for a, b in itertools.product(range(size), range(size)):
                trial = [list(g) for g in best]
                trial[gi][a], trial[gj][b] = best[gj][b], best[gi][a]
                score = _score(similarity, trial)
                if score > best_score + tol:
                    best, best_score, improved = trial, score, True
    return canonical(best)


def query_permutation(groups: Groups, num_heads: int, num_kv_heads: int) -> list[int]:
    """New query head j reads old query head perm[j]: the query heads of group g's KV heads
    become the contiguous block g that GQA maps onto new KV head g."""
    per_kv = num_heads // num_kv_heads
    return [k * per_kv + i for g in groups for k in g for i in range(per_kv)]


@dataclass
class HeadStats:
    """Calibration statistics: per layer, the Gram matrices [H_kv, H_kv] of the K and V
    projection outputs (one D-vector per head and token), summed over TOKENS tokens."""

    key_gram: np.ndarray  # [layers, H_kv, H_kv] float64
    value_gram: np.ndarray  # [layers, H_kv, H_kv]
    tokens: int
    source: str  # where the calibration text came from
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


# --- the pass -----------------------------------------------------------------------------------


class MatchFailure(Exception):
    """Why a layer's attention could not be rewritten."""


@dataclass
class _Projection:
    matmul: ir.Node  # MatMul(x, W) with W an initializer [in, out]
    add: ir.Node | None  # Add(MatMul, b) with b an initializer [out]
    bias_index: int  # input index of b in `add`
    chain: list[ir.Node]  # per-head ops from the projection's output to the attention input

    @property
    def weight(self) -> ir.Value:
        return self.matmul.inputs[1]  # type: ignore[return-value]

    @property
    def bias(self) -> ir.Value | None:
        return self.add.inputs[self.bias_index] if self.add is not None else None

    @property
    def output(self) -> ir.Value:
        return (self.add or self.matmul).outputs[0]


def _single_use(value: ir.Value, what: str) -> ir.Node:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        raise MatchFailure(
            f"{what}: {value.name} has {len(uses)} consumers; it must feed only the attention"
        )
    return uses[0].node


def _initializer(value: ir.Value | None, rank: int) -> np.ndarray | None:
    if value is None or value.const_value is None or not value.is_initializer():
        return None
    array = value.const_value.numpy()
    return array if array.ndim == rank else None


def _trace_projection(attention_input: ir.Value, what: str) -> _Projection:
    """Walk up from an attention input through per-head ops to MatMul (+ bias Add)."""
    chain: list[ir.Node] = []
    value = attention_input
    node = value.producer()
    while node is not None and node.domain == "" and node.op_type in _CHAIN_OPS:
        chain.append(node)
        value = node.inputs[0]  # type: ignore[assignment]
        _single_use(value, what)
        node = value.producer()
    add, bias_index = None, 0
    if node is not None and node.op_type == "Add" and node.domain == "":
        bias_index = next((i for i in (1, 0) if _initializer(node.inputs[i], 1) is not None), -1)
        if bias_index < 0:
            raise MatchFailure(f"{what}: Add {node.name} before attention has no bias initializer")
        add = node
        value = node.inputs[1 - bias_index]  # type: ignore[assignment]
        _single_use(value, what)
        node = value.producer()
    if node is None or node.op_type != "MatMul" or _initializer(node.inputs[1], 2) is None:
        found = "a graph input" if node is None else f"{node.op_type} {node.name}"
        raise MatchFailure(
            f"{what}: expected a MatMul with a weight initializer (the projection), found {found}"
        )
    if not any(n.op_type == "Reshape" for n in chain):
        raise MatchFailure(f"{what}: no Reshape splits the projection into heads")
    chain.reverse()
    return _Projection(node, add, bias_index, chain)


def _trace_output_projection(attention_output: ir.Value) -> ir.Node:
    """Walk down from the attention output through reshapes to the output projection."""
    value = attention_output
    while True:
        node = _single_use(value, "output")
        usage = next(iter(value.uses()))
        if node.domain == "" and node.op_type in _OUT_CHAIN_OPS and usage.idx == 0:
            value = node.outputs[0]
            continue
        if (
            node.op_type == "MatMul"
            and usage.idx == 0
            and _initializer(node.inputs[1], 2) is not None
        ):
            return node
        raise MatchFailure(
            f"output: expected the output projection MatMul after attention, found {node.op_type}"
        )


class CollapseKVHeadsPass(EnginePass):
    """Collapse every layer's KV heads to NUM_KV_HEADS by mean-pooling groups of heads.

    Requires: FlashAttention plugin nodes (run after fuse-attention, before backend lowering)
    whose K and V come from MatMul projections with weight initializers.
    Ensures: every FlashAttention node and KV-cache input/output has NUM_KV_HEADS heads.
    Configuration (constructor): the target, the grouping, and for ``similarity`` (and for the
    reconstruction-error report) calibration statistics; EXPECTED_LAYERS, when given, is the
    number of attention layers the model has (all must be rewritten).
    """

    name = "collapse-kv-heads"

    def __init__(
        self,
        num_kv_heads: int,
        grouping: str = "contiguous",
        stats: HeadStats | None = None,
        expected_layers: int | None = None,
        max_seq_len_dim: str | int = "max_seq_len",
    ) -> None:
        super().__init__()
        if grouping not in GROUPINGS:
            raise PassError(f"--kv-grouping must be one of {', '.join(GROUPINGS)}")
        if grouping == "similarity" and stats is None:
            raise PassError(
                "--kv-grouping similarity needs calibration statistics [developer error]"
            )
        self.target = num_kv_heads
        self.grouping = grouping
        self.stats = stats
        self.expected_layers = expected_layers
        self.max_seq_len_dim = max_seq_len_dim

    def _attention_nodes(self, model: ir.Model) -> list[ir.Node]:
        return [n for n in model.graph if n.domain == schema.DOMAIN and n.op_type == schema.OP_TYPE]

    def _check_attention(self, model: ir.Model) -> None:
        # Not `requires`: onnx_ir replaces what that raises with a generic PreconditionError.
        found = len(self._attention_nodes(model))
        if not found:
            raise PassError(
                f"{self.name}: the model has no FlashAttention node to rewrite (run it after "
                "fuse-attention on a decoder export); --kv-heads needs fused attention"
            )
        if self.expected_layers is not None and found != self.expected_layers:
            raise PassError(
                f"{self.name}: only {found} of {self.expected_layers} attention layers are fused; "
                "--kv-heads needs every layer fused (drop --kv-heads, or report the export form)"
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self._check_attention(model)
        graph = model.graph
        nodes = sorted(self._attention_nodes(model), key=self._layer)
        attrs = [
            schema.FlashAttentionAttrs.from_node_attributes(
                {k: a.value for k, a in n.attributes.items()}
            )
            for n in nodes
        ]
        heads, kv_heads, head_dim = attrs[0].num_heads, attrs[0].kv_num_heads, attrs[0].head_dim
        if any(
            (a.num_heads, a.kv_num_heads, a.head_dim) != (heads, kv_heads, head_dim) for a in attrs
        ):
            raise PassError(f"{self.name}: layers differ in head counts; not supported")
        check_target(self.target, heads, kv_heads)
        layers = len(nodes)
        self.report = {
            "kv_heads_before": kv_heads,
            "kv_heads_after": self.target,
            "grouping": self.grouping,
            "layers": layers,
            "kv_bytes_per_token_before": 2 * layers * kv_heads * head_dim * 4,
            "kv_bytes_per_token_after": 2 * layers * self.target * head_dim * 4,
        }
        if self.target == kv_heads:
            self.report["identity"] = True  # nothing to pool: the model is unchanged
            return ir.passes.PassResult(model, modified=False)

        groups = self._choose_groups(layers, kv_heads)
        failures: dict[str, str] = {}
        plans = []
        for node, layer_groups in zip(nodes, groups, strict=True):
            try:
                plans.append(self._plan(node, layer_groups, heads, kv_heads))
            except MatchFailure as why:
                failures[node.name or "?"] = str(why)
        if failures:
            reasons = "; ".join(f"{k}: {v}" for k, v in failures.items())
            raise PassError(
                f"{self.name}: cannot rewrite {len(failures)} of {layers} attention layers "
                f"({reasons}); report this export form with the model's config.json"
            )
        permuted = 0
        for node, plan, layer_groups in zip(nodes, plans, groups, strict=True):
            permuted += self._rewrite(graph, node, plan, layer_groups, heads, kv_heads, head_dim)
        common.RemoveUnusedNodesPass()(model)
        self.report["layers_rewritten"] = len(plans)
        self.report["layers_query_permuted"] = permuted
        self.report.update(self._quality(groups, kv_heads))
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        if self.report.get("identity"):
            return
        for node in self._attention_nodes(model):
            if node.attributes.get_int("kv_num_heads") != self.target:
                raise ir.passes.PostconditionError(f"{self.name}: {node.name} was not rewritten")

    # -- grouping and report ----------------------------------------------------------------

    @staticmethod
    def _layer(node: ir.Node) -> int:
        cache = node.inputs[3]
        name = cache.name if cache is not None and cache.name else ""
        return int(name.rsplit(".", 1)[1]) if "." in name else 0

    def _choose_groups(self, layers: int, kv_heads: int) -> list[Groups]:
        if self.stats is not None and self.stats.key_gram.shape != (layers, kv_heads, kv_heads):
            raise PassError(
                f"{self.name}: calibration statistics have shape {self.stats.key_gram.shape}, "
                f"expected {(layers, kv_heads, kv_heads)} [developer error]"
            )
        if self.grouping == "contiguous" or self.stats is None:
            return [contiguous_groups(kv_heads, self.target) for _ in range(layers)]
        return [
            similarity_groups(
                similarity_matrix(self.stats.key_gram[i], self.stats.value_gram[i]), self.target
            )
            for i in range(layers)
        ]

    def _quality(self, groups: list[Groups], kv_heads: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if any(not is_contiguous(g) for g in groups) or self.grouping == "similarity":
            out["groups"] = groups
        if self.stats is None:
            return out
        contiguous = contiguous_groups(kv_heads, self.target)
        key = [pooling_error(self.stats.key_gram[i], g) for i, g in enumerate(groups)]
        value = [pooling_error(self.stats.value_gram[i], g) for i, g in enumerate(groups)]
        base = [
            pooling_error(self.stats.key_gram[i], contiguous)
            + pooling_error(self.stats.value_gram[i], contiguous)
            for i in range(len(groups))
        ]
        out["reconstruction_error_mean"] = {
            "key": round(float(np.mean(key)), 6),
            "value": round(float(np.mean(value)), 6),
            "kv": round(float(np.mean(key) + np.mean(value)) / 2, 6),
        }
        if self.grouping == "similarity":
            # The same measure had the heads been pooled contiguously (what similarity beats).
            out["reconstruction_error_mean_contiguous"] = round(float(np.mean(base)) / 2, 6)
        out["calibration"] = {
            "tokens": self.stats.tokens,
            "source": self.stats.source,
            "seconds": round(self.stats.seconds, 3),
        }
        out["per_layer_reconstruction_error"] = {
            "metric": "sum ||x_h - group mean||^2 / sum ||x_h||^2 over calibration tokens",
            "key": [round(x, 6) for x in key],
            "value": [round(x, 6) for x in value],
        }
        return out

    # -- rewriting --------------------------------------------------------------------------

    def _plan(self, node: ir.Node, groups: Groups, heads: int, kv_heads: int) -> dict[str, Any]:
        plan: dict[str, Any] = {
            "key": _trace_projection(node.inputs[1], "key"),  # type: ignore[arg-type]
            "value": _trace_projection(node.inputs[2], "value"),  # type: ignore[arg-type]
        }
        if not is_contiguous(groups):
            plan["query"] = _trace_projection(node.inputs[0], "query")  # type: ignore[arg-type]
            plan["output"] = _trace_output_projection(node.outputs[0])
        for kind in ("key", "value"):
            width = plan[kind].weight.const_value.shape[1]  # type: ignore[union-attr]
            if width % kv_heads:
                raise MatchFailure(f"{kind}: projection width {width} is not {kv_heads} heads")
        return plan

    def _new_initializer(self, graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
        graph.register_initializer(value)
        return value

    def _rewrite(
        self,
        graph: ir.Graph,
        node: ir.Node,
        plan: dict[str, Any],
        groups: Groups,
        heads: int,
        kv_heads: int,
        head_dim: int,
    ) -> int:
        layer = self._layer(node)
        for kind in ("key", "value"):
            proj: _Projection = plan[kind]
            w = proj.weight.const_value.numpy()  # type: ignore[union-attr]
            pooled = _pool_columns(w, groups, kv_heads)
            proj.matmul.replace_input_with(
                1, self._new_initializer(graph, f"collapse_kv.{layer}.{kind}.weight", pooled)
            )
            if proj.add is not None and proj.bias is not None:
                b = proj.bias.const_value.numpy()  # type: ignore[union-attr]
                proj.add.replace_input_with(
                    proj.bias_index,
                    self._new_initializer(
                        graph,
                        f"collapse_kv.{layer}.{kind}.bias",
                        _pool_columns(b, groups, kv_heads),
                    ),
                )
            # The first Reshape splits [B, S, H_kv*D] into heads: make it [B, S, N, D].
            split = next(n for n in proj.chain if n.op_type == "Reshape")
            shape = self._new_initializer(
                graph,
                f"collapse_kv.{layer}.{kind}.heads_shape",
                np.array([0, 0, self.target, head_dim], np.int64),
            )
            split.replace_input_with(1, shape)
            split.attributes["allowzero"] = ir.AttrInt64("allowzero", 0)
            for n in proj.chain:
                if n.op_type == "RotaryEmbedding" and "num_heads" in n.attributes:
                    n.attributes["num_heads"] = ir.AttrInt64("num_heads", self.target)
            for v in [proj.matmul.outputs[0], proj.output, *(n.outputs[0] for n in proj.chain)]:
                v.shape = None  # stale head counts; the runtime infers them
        permuted = 0
        if "query" in plan:
            perm = query_permutation(groups, heads, kv_heads)
            q: _Projection = plan["query"]
            w = q.weight.const_value.numpy()  # type: ignore[union-attr]
            q.matmul.replace_input_with(
                1,
                self._new_initializer(
                    graph, f"collapse_kv.{layer}.query.weight", _permute_heads(w, perm, axis=1)
                ),
            )
            if q.add is not None and q.bias is not None:
                b = q.bias.const_value.numpy()  # type: ignore[union-attr]
                q.add.replace_input_with(
                    q.bias_index,
                    self._new_initializer(
                        graph, f"collapse_kv.{layer}.query.bias", _permute_heads(b, perm, axis=0)
                    ),
                )
            out: ir.Node = plan["output"]
            w = out.inputs[1].const_value.numpy()  # type: ignore[union-attr]
            out.replace_input_with(
                1,
                self._new_initializer(
                    graph, f"collapse_kv.{layer}.output.weight", _permute_heads(w, perm, axis=0)
                ),
            )
            permuted = 1
        node.attributes["kv_num_heads"] = ir.AttrInt64("kv_num_heads", self.target)
        for cache_index in (3, 4):
            cache = node.inputs[cache_index]
            if cache is None:
                continue
            batch = cache.shape[0] if cache.shape else "batch"
            length = cache.shape[2] if cache.shape else self.max_seq_len_dim
            cache.shape = ir.Shape([batch, self.target, length, head_dim])
            node.outputs[cache_index - 2].shape = ir.Shape([batch, self.target, length, head_dim])
        return permuted


def _pool_columns(array: np.ndarray, groups: Groups, kv_heads: int) -> np.ndarray:
    """Mean of the head blocks of ARRAY's last axis ([..., H_kv*D] -> [..., N*D]) per group."""
    head_dim = array.shape[-1] // kv_heads
    heads = array.astype(np.float64).reshape(*array.shape[:-1], kv_heads, head_dim)
    pooled = np.stack([heads[..., g, :].mean(axis=-2) for g in groups], axis=-2)
    return pooled.reshape(*array.shape[:-1], len(groups) * head_dim).astype(array.dtype)


def _permute_heads(array: np.ndarray, perm: list[int], axis: int) -> np.ndarray:
    """Reorder the head blocks along AXIS: block j of the result is block perm[j] of ARRAY."""
    head_dim = array.shape[axis] // len(perm)
    index = np.concatenate([np.arange(p * head_dim, (p + 1) * head_dim) for p in perm])
    return np.take(array, index, axis=axis)
