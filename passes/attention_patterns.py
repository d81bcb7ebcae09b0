"""Reading the decomposed attention chain that eager attention (any opset) and SDPA below
opset 23 export to, anchored at its Softmax. Used by fuse_attention.py (the rewrite lives there).

    scores_BHSS = MatMul(query_BHSD [* s_q], K^T [* s_k]) [* s | / d]
    probs_BHSS  = Softmax(Add(scores, mask) | Where(cond, scores, -big), axis=-1)
                  [-> Where(IsNaN(probs), 0, probs)]
    out_BHSD    = MatMul(probs, value_BHSD)

Forms seen in torch 2.13 exports: eager scales the scores (Mul by head_dim**-0.5); torch's SDPA
decomposition scales Q and K^T by sqrt(scale) each and transposes K through a 3-D view
(Reshape [-1, S, D] -> Transpose [0, 2, 1] -> Reshape [B, H, D, S]).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

# A mask fill at or below this counts as "minus infinity" (HF uses finfo.min, torch -inf).
_MASK_FILL_MAX = -1e4

# A dimension as the shape evaluator sees it: a known size, or (id(value), axis).
_Dim = int | tuple[int, int]


class MatchFailure(Exception):
    """Why an attention block could not be fused (reported per layer)."""


@dataclass
class DecomposedChain:
    query_BHSD: ir.Value  # before any scale multiplier
    key_BHSD: ir.Value  # un-transposed, repeat-KV still applied
    value_BHSD: ir.Value
    scale: float
    output_BHSD: ir.Value  # MatMul(probs, V)
    root: ir.Node  # that MatMul


def _op(value: ir.Value | None) -> str:
    node = value.producer() if value is not None else None
    if node is None:
        return "a graph input or constant"
    return node.op_type if node.domain == "" else f"{node.domain}::{node.op_type}"


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain == "" else None


def _const_scalar(value: ir.Value | None) -> float | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is None or tensor.size != 1:
        return None
    return float(tensor.numpy().reshape(()))


def _const_ints(value: ir.Value | None) -> list[int] | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None else [int(x) for x in tensor.numpy().reshape(-1)]


def _strip_scale(value: ir.Value) -> tuple[ir.Value, float]:
    """Walk up through Mul / Div by constant scalars; return the unscaled value and the factor."""
    factor = 1.0
    while (node := value.producer()) is not None and node.domain == "":
        a, b = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
        if node.op_type == "Mul" and (c := _const_scalar(b)) is not None:
            value, factor = a, factor * c  # type: ignore[assignment]
        elif node.op_type == "Mul" and (c := _const_scalar(a)) is not None:
            value, factor = b, factor * c  # type: ignore[assignment]
        elif node.op_type == "Div" and (c := _const_scalar(b)) is not None and c != 0:
            value, factor = a, factor / c  # type: ignore[assignment]
        else:
            break
    return value, factor


def feeds_matmul(softmax: ir.Node) -> bool:
    """Whether SOFTMAX's probabilities reach a MatMul within two steps: an attention block (a
    softmax over logits is not one)."""
    frontier = [softmax]
    for _ in range(2):
        frontier = [user for node in frontier for o in node.outputs for user, _ in o.uses()]
        if any(n.op_type == "MatMul" and n.domain == "" for n in frontier):
            return True
    return False


def _probs_matmul(softmax: ir.Node) -> ir.Node:
    """The MatMul(probs, V) SOFTMAX feeds, directly or through the NaN guard."""
    probs = softmax.outputs[0]
    users = {n.op_type: (n, i) for n, i in probs.uses()}
    if len(probs.uses()) == 2 and set(users) == {"IsNaN", "Where"}:
        isnan, where = users["IsNaN"][0], users["Where"][0]
        if (
            where.inputs[0] is isnan.outputs[0]
            and _const_scalar(where.inputs[1]) == 0.0
            and where.inputs[2] is probs
            and len(isnan.outputs[0].uses()) == 1
        ):
            probs = where.outputs[0]
    uses = list(probs.uses())
    if len(uses) != 1 or uses[0][0].op_type != "MatMul" or uses[0][1] != 0:
        found = ", ".join(f"{n.op_type}[{i}]" for n, i in uses) or "nothing"
        raise MatchFailure(
            f"Softmax found but its probabilities feed {found}, expected only MatMul(probs, V) "
            "(optionally through Where(IsNaN(probs), 0, probs))"
        )
    return uses[0][0]


def _scores_and_mask(a: ir.Value, b: ir.Value) -> tuple[ir.Value, ir.Value]:
    """Order the operands of the mask Add: the scores are the (scaled) MatMul(Q, K^T), or
    failing that a product (whose multiplier is then reported), the mask the other one."""
    for x, y in ((a, b), (b, a)):
        if _producer(_strip_scale(x)[0], "MatMul") is not None:
            return x, y
    for x, y in ((a, b), (b, a)):
        if _op(x) in ("Mul", "Div"):
            return x, y
    return a, b


def _unmask(softmax: ir.Node) -> ir.Value:
    """The scores before the causal / sliding-window mask; fails if there is no mask."""
    logits = softmax.inputs[0]
    node = logits.producer() if logits is not None else None
    if node is not None and node.domain == "" and node.op_type == "Add":
        scores, mask = _scores_and_mask(node.inputs[0], node.inputs[1])  # type: ignore[arg-type]
        if ir.convenience.get_const_tensor(mask) is not None:
            raise MatchFailure(
                "Softmax found but its mask Add adds a constant, not a causal mask built from "
                "the positions"
            )
        return scores
    if node is not None and node.domain == "" and node.op_type == "Where":
        cond, x, y = node.inputs
        if ir.convenience.get_const_tensor(cond) is not None:  # type: ignore[arg-type]
            raise MatchFailure(
                "Softmax found but its masked_fill Where has a constant condition, not a causal "
                "mask built from the positions"
            )
        for kept, fill in ((x, y), (y, x)):
            if (f := _const_scalar(fill)) is not None and f <= _MASK_FILL_MAX:
                return kept  # type: ignore[return-value]
        raise MatchFailure(
            "Softmax found but its input Where has no constant fill <= -1e4 (masked_fill): "
            "not a causal mask"
        )
    raise MatchFailure(
        f"Softmax found but its input is {_op(logits)}, not a mask Add or Where: an "
        "attention without a causal mask is not fused"
    )


def _shape_dims(value: ir.Value | None) -> list[_Dim] | None:
    """Evaluate a small shape subgraph (constants, Shape, Slice, Concat) to its dims, or None."""
    if (ints := _const_ints(value)) is not None:
        return list(ints)
    node = value.producer() if value is not None else None
    if node is None or node.domain != "":
        return None
    if node.op_type == "Shape":
        x = node.inputs[0]
        if x is None or x.shape is None:
            return None
        dims: list[_Dim] = [d if isinstance(d, int) else (id(x), i) for i, d in enumerate(x.shape)]
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", len(dims))
        return dims[start:end]
    if node.op_type == "Concat" and node.attributes.get_int("axis", 0) == 0:
        parts = [_shape_dims(v) for v in node.inputs]
        return None if any(p is None for p in parts) else [d for p in parts for d in p]  # type: ignore[union-attr]
    if node.op_type == "Slice":
        data = _shape_dims(node.inputs[0])
        args = [*node.inputs[1:], None, None][:4]  # starts, ends, axes?, steps?
        starts, ends = _const_ints(args[0]), _const_ints(args[1])
        axes = _const_ints(args[2]) if args[2] is not None else [0]
        steps = _const_ints(args[3]) if args[3] is not None else [1]
        if data is None or any(x is None or len(x) != 1 for x in (starts, ends, axes, steps)):
            return None
        if axes not in ([0], [-1]) or steps == [0]:
            return None
        return data[starts[0] : ends[0] : steps[0]]  # type: ignore[index]
    return None


def _dims_of(value: ir.Value, axes: list[int]) -> list[_Dim]:
    shape = value.shape
    assert shape is not None  # checked by the caller [developer error]
    return [d if isinstance(d := shape[a], int) else (id(value), a) for a in axes]


def _untranspose_key(key_t: ir.Value) -> ir.Value:
    """key_BHSD from K^T [B, H, D, S]: a Transpose, or SDPA's Reshape-Transpose-Reshape."""
    transpose = _producer(key_t, "Transpose")
    if transpose is not None:
        perm = list(transpose.attributes.get_ints("perm", []))
        if perm != [0, 1, 3, 2]:
            raise MatchFailure(
                f"MatMul(Q,K^T) found but its K^T Transpose has perm {perm}, expected [0, 1, 3, 2]"
            )
        return transpose.inputs[0]  # type: ignore[return-value]
    outer = _producer(key_t, "Reshape")
    middle = _producer(outer.inputs[0], "Transpose") if outer else None
    inner = _producer(middle.inputs[0], "Reshape") if middle else None
    if outer is None or middle is None or inner is None:
        raise MatchFailure(
            f"MatMul(Q,K^T) found but its K^T input is {_op(key_t)}, expected Transpose(perm="
            "[0,1,3,2]) or Reshape(Transpose(Reshape(K), perm=[0,2,1]))"
        )
    key = inner.inputs[0]
    if list(middle.attributes.get_ints("perm", [])) != [0, 2, 1]:
        raise MatchFailure("MatMul(Q,K^T) found but its 3-D K^T Transpose is not perm [0, 2, 1]")
    if key is None or key.shape is None or len(key.shape) != 4:
        raise MatchFailure("MatMul(Q,K^T) found but its 3-D K^T view is not of a rank-4 key")
    if _shape_dims(inner.inputs[1]) != [-1, *_dims_of(key, [2, 3])] or _shape_dims(
        outer.inputs[1]
    ) != _dims_of(key, [0, 1, 3, 2]):
        raise MatchFailure(
            "MatMul(Q,K^T) found but its Reshape-Transpose-Reshape K^T does not provably swap "
            "the key's last two axes (shapes not [-1, S, D] / [B, H, D, S])"
        )
    return key


def match_decomposed(softmax: ir.Node) -> DecomposedChain:
    """Read the chain around SOFTMAX; raise MatchFailure naming the first part that differs."""
    axis = softmax.attributes.get_int("axis", -1)
    rank = len(softmax.outputs[0].shape) if softmax.outputs[0].shape is not None else 4
    if axis not in (-1, rank - 1):
        raise MatchFailure(f"Softmax on axis {axis}, expected the key axis (-1)")
    pv = _probs_matmul(softmax)
    scores, scale = _strip_scale(_unmask(softmax))
    qk = _producer(scores, "MatMul")
    if qk is None and _op(scores) in ("Mul", "Div"):
        multiplier = scores.producer().inputs  # type: ignore[union-attr]
        raise MatchFailure(
            f"Softmax found but its MatMul(Q,K^T) input is scaled by {_op(scores)}("
            f"{', '.join(str(v.name) for v in multiplier if v is not None)}) with no constant "
            "scalar operand: the softmax scale cannot be read"
        )
    if qk is None:
        raise MatchFailure(
            f"Softmax found but its scores input is {_op(scores)}, expected MatMul(Q,K^T) "
            "times constant scalars"
        )
    query, q_scale = _strip_scale(qk.inputs[0])  # type: ignore[arg-type]
    key_t, k_scale = _strip_scale(qk.inputs[1])  # type: ignore[arg-type]
    return DecomposedChain(
        query_BHSD=query,
        key_BHSD=_untranspose_key(key_t),
        value_BHSD=pv.inputs[1],  # type: ignore[arg-type]
        scale=scale * q_scale * k_scale,
        output_BHSD=pv.outputs[0],
        root=pv,
    )
