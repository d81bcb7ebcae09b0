"""Decode steps on compiled CPU kernels (runtime/decode_kernels.py), read off an engine's graph.

The engine's ONNX graph stays the one source of truth: `DecodePlan.from_engine` walks the fused
decoder the compiler produced (norm -> packed QKV MatMul [+ bias] -> GroupQueryAttention ->
O MatMul -> skip norm -> packed gate/up MatMul -> Split -> SiLU product -> down MatMul, per
layer; final norm -> LM head) and takes its weights and attributes from it. Any other graph
(quantized weights, an unfused layer, an unknown op) gets a `DecodePlanUnsupported` with the
node that did not match, and the session keeps running every step on ONNX Runtime.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from enginesmith.plugins.flash_attention.onnxruntime import attrs_from_gqa
from enginesmith.plugins.flash_attention.schema import FlashAttentionAttrs
from enginesmith.runtime.huge_pages import huge_page_copy, huge_page_empty


class DecodePlanUnsupported(Exception):
    """The engine's graph is not the fp32 fused decoder the kernels implement (says where)."""


@dataclass
class _Graph:
    nodes: list[Any]
    producer: dict[str, Any]
    consumers: dict[str, list[Any]]
    initializers: dict[str, Any]
    model_dir: Path

    def array(self, name: str) -> np.ndarray:
        """A constant initializer as an array (external data loaded by onnx's own helper)."""
        from onnx import external_data_helper, numpy_helper

        tensor = self.initializers.get(name)
        if tensor is None:
            raise DecodePlanUnsupported(f"'{name}' is not a constant weight")
        if external_data_helper.uses_external_data(tensor):
            external_data_helper.load_external_data_for_tensor(tensor, str(self.model_dir))
        return numpy_helper.to_array(tensor)

    def only_consumer(self, value: str, op_type: str) -> Any:
        users = self.consumers.get(value, [])
        if len(users) != 1 or users[0].op_type != op_type:
            found = ", ".join(f"{u.op_type} '{u.name}'" for u in users) or "nothing"
            raise DecodePlanUnsupported(f"'{value}' feeds {found}, expected one {op_type}")
        return users[0]

    def one_consumer_of_type(self, value: str, op_type: str) -> Any:
        """The one OP_TYPE node among VALUE's consumers (a residual also feeds the next add)."""
        users = [u for u in self.consumers.get(value, []) if u.op_type == op_type]
        if len(users) != 1:
            raise DecodePlanUnsupported(f"'{value}' feeds {len(users)} {op_type} nodes, expected 1")
        return users[0]

    def made_by(self, value: str, op_type: str) -> Any:
        node = self.producer.get(value)
        if node is None or node.op_type != op_type:
            got = "a graph input or weight" if node is None else f"{node.op_type} '{node.name}'"
            raise DecodePlanUnsupported(f"'{value}' comes from {got}, expected {op_type}")
        return node


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _weight_nk(graph: _Graph, matmul: Any) -> np.ndarray:
    """The [N, K] view of a MatMul's [K, N] weight (_stack makes the one contiguous copy)."""
    if matmul.op_type != "MatMul":
        raise DecodePlanUnsupported(
            f"{matmul.op_type} '{matmul.name}': the decode kernels take fp32 MatMul weights only"
        )
    weight = graph.array(matmul.input[1])
    if weight.dtype != np.float32 or weight.ndim != 2:
        raise DecodePlanUnsupported(f"MatMul '{matmul.name}' weight is not a 2-D fp32 matrix")
    return weight.T


@dataclass
class DecodePlan:
    """Weights stacked per layer and the attention attributes of an fp32 fused decoder."""

    attention: FlashAttentionAttrs
    eps: float
    embed: np.ndarray  # [V, D]
    lm_head: np.ndarray  # [V, D]
    # Weights are stored [out, in] (the MatMul weights transposed): see matmul_nk.
    w_qkv: np.ndarray  # [L, (N + 2 Nkv) H, D]
    b_qkv: np.ndarray  # [L, (N + 2 Nkv) H] or [0, 0] without biases
    w_o: np.ndarray  # [L, D, N H]
    w_gate_up: np.ndarray  # [L, 2 I, D]
    w_down: np.ndarray  # [L, D, I]
    norm_in: np.ndarray  # [L, D]
    norm_post: np.ndarray  # [L, D]
    norm_final: np.ndarray  # [D]
    cos_cache: np.ndarray  # [P, R/2] (a [1, 1] placeholder without rotary)
    sin_cache: np.ndarray

    @classmethod
    def from_engine(cls, model_path: Path) -> DecodePlan:
        """Read the plan off MODEL_PATH's graph; DecodePlanUnsupported names what differs."""
        import onnx

        proto = onnx.load(str(model_path), load_external_data=False).graph
        producer: dict[str, Any] = {}
        consumers: dict[str, list[Any]] = {}
        for node in proto.node:
            for out in node.output:
                producer[out] = node
            for inp in node.input:
                consumers.setdefault(inp, []).append(node)
        graph = _Graph(
            list(proto.node),
            producer,
            consumers,
            {t.name: t for t in proto.initializer},
            model_path.parent,
        )
        return _read_plan(graph)


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    """One C-contiguous [L, ...] fp32 array on huge pages (np.stack keeps transposed inputs'
    memory order)."""
    out = huge_page_empty((len(arrays), *arrays[0].shape), np.float32)
    for i, array in enumerate(arrays):
        out[i] = array
    return out


QUANTIZED_OPS = ("MatMulNBits", "GatherBlockQuantized", "DequantizeLinear", "MatMulInteger")


def _read_plan(graph: _Graph) -> DecodePlan:
    quantized = next((n for n in graph.nodes if n.op_type in QUANTIZED_OPS), None)
    if quantized is not None:
        raise DecodePlanUnsupported(
            f"{quantized.op_type} '{quantized.name}': the decode kernels take fp32 weights only"
        )
    gqa_nodes = [n for n in graph.nodes if n.op_type == "GroupQueryAttention"]
    if not gqa_nodes:
        raise DecodePlanUnsupported("no GroupQueryAttention node (attention was not fused)")
    embed_gather = graph.made_by("embedding", "Gather") if "embedding" in graph.producer else None
    if embed_gather is None or embed_gather.input[1] != "input_ids":
        raise DecodePlanUnsupported("the token embedding is not one Gather of input_ids")
    residual = embed_gather.output[0]
    eps_seen: set[float] = set()
    attention: FlashAttentionAttrs | None = None
    rotary_names: tuple[str, str] | None = None
    layers: dict[str, list[np.ndarray]] = {k: [] for k in ("qkv", "bias", "o", "gu", "down")}
    norm_in: list[np.ndarray] = []
    norm_post: list[np.ndarray] = []
    mlp_out: str | None = None  # the previous layer's down-projection output
    for gqa in gqa_nodes:
        # Input norm: plain for layer 0, residual-add + norm after that.
        if mlp_out is None:
            norm = graph.one_consumer_of_type(residual, "SimplifiedLayerNormalization")
            if norm.input[0] != residual:
                raise DecodePlanUnsupported(
                    f"layer 0 norm '{norm.name}' input is not the embedding"
                )
        else:
            norm = graph.only_consumer(mlp_out, "SkipSimplifiedLayerNormalization")
            if set(norm.input[:2]) != {mlp_out, residual} or len(norm.input) > 3:
                raise DecodePlanUnsupported(f"'{norm.name}' is not residual + MLP output")
            residual = norm.output[3]
        eps_seen.add(float(_attrs(norm).get("epsilon", 1e-5)))
        norm_in.append(graph.array(norm.input[2] if mlp_out is not None else norm.input[1]))
        qkv_mm = graph.only_consumer(norm.output[0], "MatMul")
        layers["qkv"].append(_weight_nk(graph, qkv_mm))
        qkv_out = qkv_mm.output[0]
        users = graph.consumers.get(qkv_out, [])
        if len(users) == 1 and users[0].op_type == "Add":
            bias_name = next(i for i in users[0].input if i != qkv_out)
            layers["bias"].append(graph.array(bias_name).reshape(-1))
            qkv_out = users[0].output[0]
        if graph.only_consumer(qkv_out, "GroupQueryAttention") is not gqa or gqa.input[1]:
            raise DecodePlanUnsupported(f"'{gqa.name}' does not take one packed QKV input")
        attrs = _attrs(gqa)
        if int(attrs.get("softcap", 0)) or any(gqa.input[9:16]):
            raise DecodePlanUnsupported(f"'{gqa.name}' uses inputs or attributes not covered")
        layer_attn = attrs_from_gqa(attrs, packed_width=layers["qkv"][-1].shape[0])
        if attention is None:
            attention = layer_attn
        elif layer_attn != attention:
            raise DecodePlanUnsupported(f"'{gqa.name}' differs from layer 0's attention")
        if layer_attn.rotary:
            names = (gqa.input[7], gqa.input[8])
            if rotary_names is None:
                rotary_names = names
            elif names != rotary_names:
                raise DecodePlanUnsupported("layers use different rotary tables")
        o_mm = graph.only_consumer(gqa.output[0], "MatMul")
        layers["o"].append(_weight_nk(graph, o_mm))
        post = graph.only_consumer(o_mm.output[0], "SkipSimplifiedLayerNormalization")
        if set(post.input[:2]) != {o_mm.output[0], residual} or len(post.input) > 3:
            raise DecodePlanUnsupported(f"'{post.name}' is not residual + attention output")
        eps_seen.add(float(_attrs(post).get("epsilon", 1e-5)))
        norm_post.append(graph.array(post.input[2]))
        residual = post.output[3]
        gu_mm = graph.only_consumer(post.output[0], "MatMul")
        layers["gu"].append(_weight_nk(graph, gu_mm))
        split = graph.only_consumer(gu_mm.output[0], "Split")
        sizes = graph.array(split.input[1]).tolist() if len(split.input) > 1 else []
        if len(sizes) != 2 or sizes[0] != sizes[1] or _attrs(split).get("axis", 0) not in (-1, 2):
            raise DecodePlanUnsupported(f"'{split.name}' is not an even gate/up split")
        gate, up = split.output[0], split.output[1]
        sigmoid = next((u for u in graph.consumers.get(gate, []) if u.op_type == "Sigmoid"), None)
        if sigmoid is None:
            raise DecodePlanUnsupported(f"no Sigmoid of the gate after '{split.name}'")
        silu = next(
            (u for u in graph.consumers.get(sigmoid.output[0], []) if u.op_type == "Mul"), None
        )
        if silu is None or set(silu.input) != {gate, sigmoid.output[0]}:
            raise DecodePlanUnsupported(f"no SiLU(gate) after '{split.name}'")
        product = graph.only_consumer(silu.output[0], "Mul")
        if set(product.input) != {silu.output[0], up}:
            raise DecodePlanUnsupported(f"'{product.name}' is not SiLU(gate) * up")
        down_mm = graph.only_consumer(product.output[0], "MatMul")
        layers["down"].append(_weight_nk(graph, down_mm))
        mlp_out = down_mm.output[0]
    assert attention is not None and mlp_out is not None
    final = graph.only_consumer(mlp_out, "SkipSimplifiedLayerNormalization")
    if set(final.input[:2]) != {mlp_out, residual} or len(final.input) > 3:
        raise DecodePlanUnsupported(f"'{final.name}' is not the final residual norm")
    eps_seen.add(float(_attrs(final).get("epsilon", 1e-5)))
    reshape = graph.only_consumer(final.output[0], "Reshape")
    pick = graph.only_consumer(reshape.output[0], "Gather")
    head = graph.only_consumer(pick.output[0], "Gemm")
    head_attrs = _attrs(head)
    if not head_attrs.get("transB") or head_attrs.get("transA") or len(head.input) > 2:
        raise DecodePlanUnsupported(f"LM head '{head.name}' is not x @ W^T")
    if len(eps_seen) != 1:
        raise DecodePlanUnsupported(f"norms use different epsilons {sorted(eps_seen)}")
    if layers["bias"] and len(layers["bias"]) != len(gqa_nodes):
        raise DecodePlanUnsupported("only some layers have q/k/v biases")
    # Copies on huge pages (runtime/huge_pages.py: fewer TLB misses; the LM head streams a
    # fifth of a step's bytes). A tied head stays one array.
    embed = huge_page_copy(graph.array(embed_gather.input[0]))
    tied = head.input[1] == embed_gather.input[0]
    lm_head = embed if tied else huge_page_copy(graph.array(head.input[1]))
    if rotary_names is not None:
        cos, sin = graph.array(rotary_names[0]), graph.array(rotary_names[1])
    else:
        cos = sin = np.zeros((1, 1), np.float32)
    return DecodePlan(
        attention=attention,
        eps=eps_seen.pop(),
        embed=embed,
        lm_head=lm_head,
        w_qkv=_stack(layers["qkv"]),
        b_qkv=_stack(layers["bias"]) if layers["bias"] else np.zeros((0, 0), np.float32),
        w_o=_stack(layers["o"]),
        w_gate_up=_stack(layers["gu"]),
        w_down=_stack(layers["down"]),
        norm_in=_stack(norm_in),
        norm_post=_stack(norm_post),
        norm_final=graph.array(final.input[2]).astype(np.float32),
        cos_cache=np.ascontiguousarray(cos, np.float32),
        sin_cache=np.ascontiguousarray(sin, np.float32),
    )


_NO_TOKENS = np.zeros(0, np.int64)  # a single step: logits out, no greedy run


class CompiledDecoder:
    """Runs decode steps (one new token per row) of a DecodePlan on the compiled kernels,
    over the session's KV caches [L, max_batch, Nkv, MAX, H] (updated in place)."""

    def __init__(self, plan: DecodePlan, max_batch: int, max_seq_len: int, threads: int) -> None:
        import numba

        from enginesmith.runtime import decode_kernels

        most = int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
        numba.set_num_threads(max(1, min(threads, most)))
        self.plan, self.max_batch = plan, max_batch
        self.threads = numba.get_num_threads()
        a = plan.attention
        self.chunk = decode_kernels.ATTENTION_CHUNK
        span = max_seq_len if a.local_window_size < 0 else min(max_seq_len, a.local_window_size)
        per_row = decode_kernels.chunks_per_row(span, self.chunk)
        items = max_batch * a.kv_num_heads * per_row
        group = a.num_heads // a.kv_num_heads
        d = plan.embed.shape[1]
        f32 = np.float32
        self._part_max = np.zeros((items, group), f32)
        self._part_sum = np.zeros((items, group), f32)
        self._part_acc = np.zeros((items, group, a.head_dim), f32)
        self._hidden = np.zeros((max_batch, d), f32)
        self._normed = np.zeros((max_batch, d), f32)
        self._qkv = np.zeros((max_batch, plan.w_qkv.shape[1]), f32)
        self._attn = np.zeros((max_batch, plan.w_o.shape[2]), f32)
        self._proj = np.zeros((max_batch, d), f32)
        self._gate_up = np.zeros((max_batch, plan.w_gate_up.shape[1]), f32)
        self._act = np.zeros((max_batch, plan.w_down.shape[2]), f32)
        self._sync = np.zeros(0, np.int64)  # sized for self.threads at each launch
        self.use_kernels(decode_kernels)

    def use_kernels(self, kernels: ModuleType) -> None:
        """Run steps on KERNELS: runtime/decode_kernels.py (the default) or an edited copy of
        it under test (scripts/compare_kernel_variants.py). Its step's thread body is loaded
        on its own before its first step, as the committed one's is."""
        self._kernels = kernels
        self._run = kernels.decode_step
        self._attention = kernels.attention_only
        self._step_thread_loaded = False

    def step(
        self,
        cache_key: np.ndarray,  # [L, max_batch, Nkv, MAX, H]
        cache_value: np.ndarray,
        start: int,
        input_ids: np.ndarray,  # [n] token per row
        positions: np.ndarray,  # [n] cache position of the new token, -1 = idle row
        logits_rows: np.ndarray,  # [m] rows that need logits
    ) -> np.ndarray:
        """Logits [m, V] of one decode step over slots [start, start + n)."""
        plan = self.plan
        per_row = self._chunks_per_row(int(positions.max()) if input_ids.shape[0] else -1)
        logits = np.empty((logits_rows.shape[0], plan.lm_head.shape[0]), np.float32)
        self._launch(False, input_ids, positions, logits_rows, start, per_row, logits,
                     cache_key, cache_value)  # fmt: skip
        return logits

    def greedy_run(
        self,
        cache_key: np.ndarray,  # [L, max_batch, Nkv, MAX, H]
        cache_value: np.ndarray,
        slot: int,
        token: int,
        position: int,
        steps: int,
        stop_ids: np.ndarray,  # [s] int64
    ) -> np.ndarray:
        """Up to STEPS greedy decode steps of slot SLOT in ONE kernel call: TOKEN at POSITION
        first, then each step's argmax token at the next position, until a token in STOP_IDS
        (kept). Returns the tokens made ([n], n <= STEPS); the cache holds the keys and values
        of every input token. The call's fixed costs (Python, waking the threads, the host
        between steps) are paid once for the run instead of once a token."""
        last = position + steps - 1
        if steps < 1 or last >= cache_key.shape[3]:
            raise ValueError(f"{steps} steps from position {position} do not fit the cache "
                             "[developer error]")  # fmt: skip
        per_row = self._chunks_per_row(last)
        tokens = np.full(steps, -1, np.int64)
        logits = np.empty((1, self.plan.lm_head.shape[0]), np.float32)
        self._launch(False, np.array([token]), np.array([position]), np.zeros(1, np.int64), slot,
                     per_row, logits, cache_key, cache_value, tokens,
                     stop_ids.astype(np.int64, copy=False))  # fmt: skip
        made = int(np.count_nonzero(tokens >= 0))
        return tokens[:made]

    def _chunks_per_row(self, last_position: int) -> int:
        """Attention chunks a row holds at most when its newest key is at LAST_POSITION
        (-1: no row has keys): they start at the window's first key."""
        window = self.plan.attention.local_window_size
        span = last_position + 1 if window < 0 else min(last_position + 1, window)
        return self._kernels.chunks_per_row(span, self.chunk)

    def _launch(
        self,
        weights_only: bool,
        input_ids: np.ndarray,
        positions: np.ndarray,
        logits_rows: np.ndarray,
        start: int,
        per_row: int,
        logits: np.ndarray,
        cache_key: np.ndarray,
        cache_value: np.ndarray,
        tokens: np.ndarray = _NO_TOKENS,
        stop_ids: np.ndarray = _NO_TOKENS,
    ) -> None:
        plan, a = self.plan, self.plan.attention
        rows, d = input_ids.shape[0], plan.embed.shape[1]
        selected = np.empty((logits_rows.shape[0], d), np.float32)
        final = np.zeros_like(selected)  # weights_only: defined inputs for the LM head
        needed = self._kernels.sync_counters(
            plan.w_qkv.shape[0], self.threads, max(1, tokens.shape[0])
        )
        if self._sync.shape[0] < needed:
            self._sync = np.zeros(needed, np.int64)
        self._sync[:needed].fill(0)
        args = (
            self.threads, weights_only,
            input_ids.astype(np.int64, copy=False),
            positions.astype(np.int64, copy=False),
            logits_rows.astype(np.int64, copy=False),
            start,
            plan.embed, plan.lm_head, plan.w_qkv, plan.b_qkv, plan.w_o, plan.w_gate_up,
            plan.w_down, plan.norm_in, plan.norm_post, plan.norm_final, np.float32(plan.eps),
            plan.cos_cache, plan.sin_cache, bool(a.rotary), bool(a.rotary_interleaved),
            cache_key, cache_value, a.num_heads, a.kv_num_heads, a.head_dim,
            np.float32(a.scale), a.local_window_size, self.chunk,
            self._part_max[: rows * a.kv_num_heads * per_row],
            self._part_sum[: rows * a.kv_num_heads * per_row],
            self._part_acc[: rows * a.kv_num_heads * per_row],
            self._hidden[:rows], self._normed[:rows], self._qkv[:rows], self._attn[:rows],
            self._proj[:rows], self._gate_up[:rows], self._act[:rows], selected, final, logits,
            tokens, stop_ids, self._sync[:needed],
        )  # fmt: skip
        if not self._step_thread_loaded:
            self._load_step_thread_first(args)
        self._run(*args)

    def _load_step_thread_first(self, args: tuple[Any, ...]) -> None:
        """Compile, or load from numba's cache, the step's thread body (_step_thread) on its
        own before decode_step, so that every process runs the same machine code. numba links
        each callee into its caller's module and optimizes that module again: decode_step's
        object carries a second, re-optimized copy of _step_thread. A process that compiles
        the kernels runs the standalone copy (the JIT linker resolves the symbol to the copy
        defined first); one that loaded them from the cache ran the re-optimized one. For the
        committed kernels the two are within a few percent; for a variant tried and dropped,
        the re-optimized copy was 12% slower (scripts/compare_step_body.py,
        docs/benchmarks.md). decode_step passes its arguments through unchanged, so their
        types are _step_thread's signature."""
        body = self._kernels._step_thread
        body.compile(tuple(body.typeof_pyval(a) for a in args))
        self._step_thread_loaded = True

    def compiled_on_disk(self) -> bool:
        """Whether numba's on-disk cache already holds the step kernel (else the first step
        compiles it, ~15 s here). Best effort: numba's cache layout is not public API."""
        try:
            index = self._run._cache._cache_file._index_path  # type: ignore[attr-defined]
        except AttributeError:
            return True  # unknown layout: stay quiet rather than guess
        return bool(self._run.signatures) or os.path.exists(index)

    def weight_products_only(self, rows: int) -> None:
        """Only the weight products of a step over `rows` rows (a diagnostic floor), in the
        step's one parallel region."""
        p = self.plan
        logits = np.empty((rows, p.lm_head.shape[0]), np.float32)
        idle = np.full(rows, -1, np.int64)  # no attention items: its buffers are not read
        self._launch(True, np.zeros(rows, np.int64), idle, np.arange(rows), 0, 1, logits,
                     np.zeros((1, 1, 1, 1, 1), np.float32), np.zeros((1, 1, 1, 1, 1), np.float32))  # fmt: skip

    def attention_only(
        self, cache_key: np.ndarray, cache_value: np.ndarray, positions: np.ndarray
    ) -> None:
        """Only the attention of a step over slots [0, len(positions)) (a diagnostic)."""
        a, rows = self.plan.attention, positions.shape[0]
        self._attention(
            self._qkv[:rows], positions.astype(np.int64, copy=False), cache_key, cache_value,
            a.num_heads, a.kv_num_heads, a.head_dim, np.float32(a.scale), a.local_window_size,
            self.chunk, self._part_max, self._part_sum, self._part_acc, self._attn[:rows],
        )  # fmt: skip
