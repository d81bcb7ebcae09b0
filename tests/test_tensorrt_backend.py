"""The GPU backends' TensorRT-ready graph, checked on CPU; the same engines on a GPU (marked).

CPU: the lowering of FlashAttention to KV-update + attention ops against the NumPy reference
(the standard-op form run by ONNX Runtime; the TRT_* form through an emulation of its documented
semantics fed by the graph's own index tensors), the whole-model graph (valid ONNX, well-formed
nodes, fp16 I/O, static cache capacity), fp16 against fp32, the optimization profiles, the
one-line errors, and (when TensorRT-RTX is installed) an ahead-of-time plan build, which runs
TensorRT's real ONNX parser and builder without a GPU.
GPU (`-m gpu`, skipped without one): the built engines against the CPU engine; each has the CPU
twin named in its docstring.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from enginesmith.compiler import export, pipeline
from enginesmith.compiler.backends import tensorrt as trt_backend
from enginesmith.compiler.config import BuildConfig
from enginesmith.passes.convert_float import ConvertFloatPass
from enginesmith.plugins.flash_attention import schema
from enginesmith.plugins.flash_attention.reference import flash_attention_reference
from enginesmith.plugins.flash_attention.tensorrt import LowerFlashAttentionToTensorRT
from enginesmith.runtime import cuda
from enginesmith.runtime.errors import BackendUnavailableError, BuildError, EngineDirError
from enginesmith.runtime.trt_executor import engine_incompatibility
from tests.conftest import PROMPTS, build_quiet

ATOL = 1e-5
# fp16 engine vs fp32 engine, relative to the largest |logit| (measured ~1e-3 on tiny-llama).
FP16_RTOL = 1e-2
HAS_GPU = cuda.device_count() > 0
HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
gpu = pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU")


# -- one FlashAttention node ----------------------------------------------------------------


def plugin_model(attrs: schema.FlashAttentionAttrs, ops: str, capacity: int) -> ir.Model:
    """A one-node FlashAttention graph lowered for TensorRT (OPS), caches as inputs/outputs."""
    f32, i32 = ir.TensorType(ir.DataType.FLOAT), ir.TensorType(ir.DataType.INT32)
    n, nkv, h = attrs.num_heads, attrs.kv_num_heads, attrs.head_dim
    inputs = [
        ir.Value(name="query", type=f32, shape=ir.Shape(["B", "S", n * h])),
        ir.Value(name="key", type=f32, shape=ir.Shape(["B", "S", nkv * h])),
        ir.Value(name="value", type=f32, shape=ir.Shape(["B", "S", nkv * h])),
        ir.Value(name="past_key.0", type=f32, shape=ir.Shape(["B", nkv, "MAX", h])),
        ir.Value(name="past_value.0", type=f32, shape=ir.Shape(["B", nkv, "MAX", h])),
        ir.Value(name="seqlens_k", type=i32, shape=ir.Shape(["B"])),
        ir.Value(name="query_seqlens", type=i32, shape=ir.Shape(["B"])),
    ]
    node = ir.node(
        schema.OP_TYPE, inputs, attrs.as_node_attributes(), domain=schema.DOMAIN, num_outputs=3
    )
    shapes = (["B", "S", n * h], ["B", nkv, "MAX", h], ["B", nkv, "MAX", h])
    names = ("output", "present_key.0", "present_value.0")
    for out, name, shape in zip(node.outputs, names, shapes, strict=True):
        out.name, out.type, out.shape = name, f32, ir.Shape(shape)
    graph = ir.Graph(
        inputs,
        list(node.outputs),
        nodes=[node],
        opset_imports={"": 23, schema.DOMAIN: 1},
        name="flash_attention",
    )
    model = ir.Model(graph, ir_version=10)
    LowerFlashAttentionToTensorRT(ops, capacity)(model)
    return model


def mixed_batch(attrs: schema.FlashAttentionAttrs, max_seq_len: int, seq: int, seed: int = 0):  # type: ignore[no-untyped-def]
    """Rows: a prefill chunk after a cached prefix, a decode row, a padded verify row (3 of S
    valid), an idle row; caches hold finite garbage everywhere."""
    rng = np.random.default_rng(seed)
    n, nkv, h = attrs.num_heads, attrs.kv_num_heads, attrs.head_dim
    past = np.array([4, max_seq_len - 1, 9, 0])
    valid = np.array([seq, 1, 3, 0])
    batch = len(past)
    q = rng.standard_normal((batch, seq, n * h)).astype(np.float32)
    k = rng.standard_normal((batch, seq, nkv * h)).astype(np.float32)
    v = rng.standard_normal((batch, seq, nkv * h)).astype(np.float32)
    ck = rng.standard_normal((batch, nkv, max_seq_len, h)).astype(np.float32)
    cv = rng.standard_normal((batch, nkv, max_seq_len, h)).astype(np.float32)
    seqlens_k = (past + valid - 1).astype(np.int32)
    seqlens_k[valid == 0] = 0  # the engine core's idle-row convention: T = 1, Q = 0
    return q, k, v, ck, cv, seqlens_k, valid.astype(np.int32), past


def with_scratch(cache: np.ndarray, capacity: int) -> np.ndarray:
    tail = np.full(cache.shape[:2] + (capacity - cache.shape[2], cache.shape[3]), 7.0, np.float32)
    return np.concatenate([cache, tail], axis=2)


def plugin_feeds(inputs, capacity: int) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """The one-layer plugin graph's feeds for a mixed_batch case, caches with scratch tails."""
    q, k, v, ck, cv, seqlens_k, valid, _ = inputs
    return {
        "query": q,
        "key": k,
        "value": v,
        "past_key.0": with_scratch(ck, capacity),
        "past_value.0": with_scratch(cv, capacity),
        "seqlens_k": seqlens_k,
        "query_seqlens": valid,
    }


def check_against_reference(attrs, inputs, outputs, capacity) -> None:  # type: ignore[no-untyped-def]
    q, k, v, ck, cv, seqlens_k, valid, past = inputs
    max_seq_len = ck.shape[2]
    want_out, want_k, want_v = flash_attention_reference(attrs, q, k, v, ck, cv, seqlens_k, valid)
    out, got_k, got_v = outputs
    assert got_k.shape[2] == capacity
    for row in range(q.shape[0]):
        if valid[row] == 0:  # idle: the slot's cache is untouched below the scratch tail
            np.testing.assert_array_equal(got_k[row, :, :max_seq_len], ck[row])
            np.testing.assert_array_equal(got_v[row, :, :max_seq_len], cv[row])
            continue
        total = past[row] + valid[row]
        np.testing.assert_allclose(out[row, : valid[row]], want_out[row, : valid[row]], atol=ATOL)
        np.testing.assert_allclose(got_k[row, :, :total], want_k[row, :, :total], atol=ATOL)
        np.testing.assert_allclose(got_v[row, :, :total], want_v[row, :, :total], atol=ATOL)


@pytest.mark.parametrize("heads", [(4, 2), (4, 1), (4, 4)], ids=["gqa", "mqa", "mha"])
@pytest.mark.parametrize("window", [-1, 5])
def test_onnx_ops_lowering_matches_reference(heads: tuple[int, int], window: int) -> None:
    """TensorScatter + Attention (opset 24), run by ONNX Runtime CPU, equals the plugin's
    reference on prefill / decode at the last position / padded verify / idle rows."""
    attrs = schema.FlashAttentionAttrs(heads[0], heads[1], 8, 0.35, window)
    max_seq_len, seq = 24, 5
    capacity = max_seq_len + seq
    inputs = mixed_batch(attrs, max_seq_len, seq)
    proto = ir.to_proto(plugin_model(attrs, "onnx", capacity))
    onnx.checker.check_model(proto)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = plugin_feeds(inputs, capacity)
    check_against_reference(attrs, inputs, session.run(None, feeds), capacity)


def emulate_trt_ops(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a one-layer TRT_* graph: ONNX Runtime computes the graph's own standard nodes (index
    math, layouts); the TRT_* nodes run as the onnx-tensorrt TRT_custom_ops.md contract says:
    KVCacheUpdate (padded) writes update[b, :, s] at cache[b, :, write_indices[b] + s];
    Attention (padded Q and KV, causal lower_right) lets query row s of row b see KV positions
    j <= s + kv_lengths[b] - S, with Q pre-scaled."""
    graph = model.graph
    by_op = {n.op_type: n for n in graph}
    update, attention = by_op["TRT_KVCacheUpdate"], by_op["TRT_Attention"]
    k_update = [n for n in graph if n.op_type == "TRT_KVCacheUpdate"]
    wanted = [
        attention.inputs[0],  # scaled Q [B, N, S, H]
        k_update[0].inputs[1],  # K [B, Hkv, S, H]
        k_update[1].inputs[1],  # V
        update.inputs[2],  # write_indices [B] int32
        attention.inputs[5],  # kv_lengths [B] int32
    ]
    probe = ir.from_proto(ir.to_proto(model))  # same graph, outputs = the values above
    names = [v.name for v in wanted]
    values = {v.name: v for n in probe.graph for v in n.outputs}
    probe.graph.outputs.clear()
    probe.graph.outputs.extend(values[name] for name in names)
    ir.passes.common.RemoveUnusedNodesPass()(probe)  # drops the TRT_* nodes and what follows
    probe.opset_imports.pop("trt", None)
    session = ort.InferenceSession(
        ir.to_proto(probe).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    feed_names = {i.name for i in session.get_inputs()}
    q, k, v, write, kv_len = session.run(None, {n: a for n, a in feeds.items() if n in feed_names})
    ck, cv = feeds["past_key.0"].copy(), feeds["past_value.0"].copy()
    batch, heads, seq, _ = q.shape
    group = heads // k.shape[1]
    for b in range(batch):
        ck[b, :, write[b] : write[b] + seq] = k[b]
        cv[b, :, write[b] : write[b] + seq] = v[b]
    out = np.zeros_like(q)
    for b in range(batch):
        for s in range(seq):
            last = s + kv_len[b] - seq
            for head in range(heads):
                keys = ck[b, head // group, : last + 1].astype(np.float64)
                scores = keys @ q[b, head, s]
                w = np.exp(scores - scores.max())
                out[b, head, s] = (w / w.sum()) @ cv[b, head // group, : last + 1]
    out_bsd = out.transpose(0, 2, 1, 3).reshape(batch, seq, -1)
    return [out_bsd, ck, cv]


@pytest.mark.parametrize("heads", [(4, 2), (4, 1)], ids=["gqa", "mqa"])
def test_trt_ops_lowering_matches_reference_under_documented_semantics(
    heads: tuple[int, int],
) -> None:
    """TRT_KVCacheUpdate + TRT_Attention: the graph's write indices and KV lengths, put through
    the ops' documented semantics, equal the reference (the kernels themselves: GPU test)."""
    attrs = schema.FlashAttentionAttrs(heads[0], heads[1], 8, 0.35)
    max_seq_len, seq = 24, 5
    capacity = max_seq_len + seq
    inputs = mixed_batch(attrs, max_seq_len, seq, seed=1)
    model = plugin_model(attrs, "trt", capacity)
    feeds = plugin_feeds(inputs, capacity)
    check_against_reference(attrs, inputs, emulate_trt_ops(model, feeds), capacity)


def test_trt_ops_nodes_are_well_formed() -> None:
    attrs = schema.FlashAttentionAttrs(4, 2, 8, 0.35)
    model = plugin_model(attrs, "trt", 40)
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto)
    nodes = [n for n in proto.graph.node if n.domain == "trt"]
    assert [n.op_type for n in nodes] == ["TRT_KVCacheUpdate", "TRT_KVCacheUpdate", "TRT_Attention"]
    attention = nodes[2]
    # Q, K, V, attn_mask (empty), query_lengths (empty), kv_lengths
    assert len(attention.input) == 6 and attention.input[3] == "" and attention.input[4] == ""
    attrs_of = {a.name: onnx.helper.get_attribute_value(a) for a in attention.attribute}
    assert attrs_of == {
        "query_form": b"padded_bhnd",
        "kv_form": b"padded_bhnd",
        "causal_kind": b"lower_right",
    }
    for update in nodes[:2]:
        assert len(update.input) == 3  # past_cache, update, write_indices (padded form)
        got = {a.name: onnx.helper.get_attribute_value(a) for a in update.attribute}
        assert got == {"update_form": b"padded_bhnd", "mode": b"linear", "axis": -2}
    assert {o.domain: o.version for o in proto.opset_import} == {"": 24, "trt": 1}
    cache = next(i for i in proto.graph.input if i.name == "past_key.0")
    assert cache.type.tensor_type.shape.dim[2].dim_value == 40  # static capacity


def test_lowering_refuses_window_with_trt_ops_and_fused_rotary() -> None:
    with pytest.raises(ValueError, match="--trt-attention onnx"):
        plugin_model(schema.FlashAttentionAttrs(4, 2, 8, 0.35, 5), "trt", 40)
    attrs = schema.FlashAttentionAttrs(4, 2, 8, 0.35)
    model = plugin_model(attrs, "onnx", 40)  # lowered already: re-add a rotary-form node
    f32 = ir.TensorType(ir.DataType.FLOAT)
    inputs = [ir.Value(name=f"x{i}", type=f32) for i in range(9)]
    node = ir.node(
        schema.OP_TYPE,
        inputs,
        {**attrs.as_node_attributes(), "rotary": 1},
        domain=schema.DOMAIN,
        num_outputs=3,
    )
    model.graph.inputs.extend(inputs)
    model.graph.append(node)
    model.graph.outputs.extend(node.outputs)
    with pytest.raises(ValueError, match="fused rotary"):
        LowerFlashAttentionToTensorRT("onnx", 40)(model)
    node.attributes["rotary"] = ir.AttrInt64("rotary", 0)
    for index in (1, 2, 7, 8):  # packed QKV: key and value empty
        node.replace_input_with(index, None)
    with pytest.raises(ValueError, match="packed QKV"):
        LowerFlashAttentionToTensorRT("onnx", 40)(model)


# -- the whole model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(hf_models):  # type: ignore[no-untyped-def]
    """preset -> (fused-ready exported model proto, dims), exported once per preset."""
    cache: dict[str, Any] = {}

    def get(preset: str) -> tuple[ir.Model, export.ModelDims]:
        if preset not in cache:
            result = export.export_model(hf_models(preset).model)
            cache[preset] = (ir.to_proto(result.model), result.dims)
        proto, dims = cache[preset]
        return ir.from_proto(proto), dims

    return get


def trt_graph(exported, preset: str, **config: Any) -> tuple[ir.Model, export.ModelDims]:  # type: ignore[no-untyped-def]
    model, dims = exported(preset)
    cfg = BuildConfig(model=preset, output=Path("unused"), **config)
    passes = pipeline.PIPELINES[cfg.backend](dims, pipeline.PassInputs(config=cfg))
    pipeline.run_pipeline(model, passes)
    return model, dims


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-mistral", "tiny-qwen2"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_tensorrt_graph_is_valid_and_well_formed(exported, preset: str, dtype: str) -> None:  # type: ignore[no-untyped-def]
    config = {"backend": "tensorrt", "dtype": dtype, "max_seq_len": 64, "max_num_tokens": 16}
    model, dims = trt_graph(exported, preset, **config)
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto)
    ops = [(n.domain, n.op_type) for n in proto.graph.node]
    assert not any(d == schema.DOMAIN for d, _ in ops)
    window = bool(dims.sliding_window)  # tiny-mistral: the mask form (auto)
    update, attention = (
        ("TensorScatter", "Attention") if window else ("TRT_KVCacheUpdate", "TRT_Attention")
    )
    assert sum(op == update for _, op in ops) == 2 * dims.num_layers
    assert sum(op == attention for _, op in ops) == dims.num_layers
    elem = {"float16": onnx.TensorProto.FLOAT16, "bfloat16": onnx.TensorProto.BFLOAT16}[dtype]
    types = {v.name: v.type.tensor_type for v in [*proto.graph.input, *proto.graph.output]}
    assert types["logits"].elem_type == onnx.TensorProto.FLOAT
    assert types["input_ids"].elem_type == onnx.TensorProto.INT64
    capacity = trt_backend.kv_cache_capacity(64, 16)
    for layer in range(dims.num_layers):
        for name in (f"past_key.{layer}", f"present_value.{layer}"):
            assert types[name].elem_type == elem
            assert [d.dim_value for d in types[name].shape.dim[1:]] == [
                dims.num_kv_heads,
                capacity,
                dims.head_dim,
            ]
    floats = {i.data_type for i in proto.graph.initializer} & {onnx.TensorProto.FLOAT}
    assert floats <= {onnx.TensorProto.FLOAT}  # only the rotary inv_freq table stays fp32
    fp32_inits = [i.name for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    assert all("inv_freq" in name for name in fp32_inits), fp32_inits


def run_graph(model: ir.Model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(["logits"], feeds)[0]


def test_fp16_graph_matches_fp32_on_onnxruntime(exported) -> None:  # type: ignore[no-untyped-def]
    """The onnxruntime-gpu graph (standard ops) in fp16 against the same graph without the dtype
    pass, both on ONNX Runtime CPU, on a mixed prefill + decode step."""
    config = {"backend": "onnxruntime-gpu", "max_seq_len": 64, "max_num_tokens": 16}
    fp16, dims = trt_graph(exported, "tiny-llama", **config)
    fp32, _ = exported("tiny-llama")
    passes = [
        p
        for p in pipeline.PIPELINES["onnxruntime-gpu"](
            dims,
            pipeline.PassInputs(
                config=BuildConfig(model="tiny-llama", output=Path("unused"), **config)
            ),
        )
        if not isinstance(p, ConvertFloatPass)
    ]
    pipeline.run_pipeline(fp32, passes)
    rng = np.random.default_rng(0)
    capacity = trt_backend.kv_cache_capacity(64, 16)
    ids = rng.integers(0, dims.vocab_size, (2, 6))
    past, valid = np.array([0, 9]), np.array([6, 1])
    feeds: dict[str, np.ndarray] = {
        "input_ids": ids,
        "position_ids": past[:, None] + np.arange(6)[None],
        "logits_indices": np.array([5, 6]),
        "seqlens_k": (past + valid - 1).astype(np.int32),
        "query_seqlens": valid.astype(np.int32),
    }
    shape = (2, dims.num_kv_heads, capacity, dims.head_dim)
    caches = {
        f"past_{kind}.{i}": (rng.standard_normal(shape) * 0.5).astype(np.float32)
        for i in range(dims.num_layers)
        for kind in ("key", "value")
    }
    want = run_graph(fp32, {**feeds, **caches})
    got = run_graph(fp16, {**feeds, **{k: v.astype(np.float16) for k, v in caches.items()}})
    assert got.dtype == np.float32
    relative = float(np.abs(got - want).max() / np.abs(want).max())
    print(f"fp16 vs fp32 logits: relative max |diff| {relative:.2e} (limit {FP16_RTOL})")
    assert relative < FP16_RTOL
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_position_arithmetic_stays_float32(exported) -> None:  # type: ignore[no-untyped-def]
    model, _ = trt_graph(
        exported, "tiny-llama", backend="tensorrt", max_seq_len=64, max_num_tokens=16
    )
    cos = next(n for n in model.graph if n.op_type == "Cos")
    assert cos.inputs[0].dtype == ir.DataType.FLOAT  # type: ignore[union-attr]
    assert any(
        n.op_type == "Cast"
        and n.attributes.get_int("to") == ir.DataType.FLOAT16
        and n.inputs[0].producer() is cos  # type: ignore[union-attr]
        for n in model.graph
    )


# -- profiles, config and errors ------------------------------------------------------------


def test_profiles_are_computed_from_the_config() -> None:
    decode, prefill = trt_backend.optimization_profiles(
        num_layers=2, num_kv_heads=3, head_dim=64, max_batch=8, max_seq_len=2048, max_num_tokens=512
    )
    assert (decode.name, prefill.name) == ("decode", "prefill")
    capacity = 2048 + 512
    assert trt_backend.kv_cache_capacity(2048, 512) == capacity
    assert decode.shapes["input_ids"] == trt_backend.ShapeRange((1, 1), (8, 1), (8, 1))
    assert prefill.shapes["input_ids"] == trt_backend.ShapeRange((1, 1), (1, 512), (8, 512))
    assert prefill.shapes["logits_indices"].max == (512,)
    assert decode.shapes["seqlens_k"] == trt_backend.ShapeRange((1,), (8,), (8,))
    assert decode.shapes["past_value.1"] == trt_backend.ShapeRange(
        (1, 3, capacity, 64), (8, 3, capacity, 64), (8, 3, capacity, 64)
    )
    assert set(prefill.shapes) == {
        "input_ids",
        "position_ids",
        "logits_indices",
        "seqlens_k",
        "query_seqlens",
        "past_key.0",
        "past_value.0",
        "past_key.1",
        "past_value.1",
    }
    # A chunk never exceeds the sequence length: the scratch tail follows min(budget, max_seq_len).
    _, small = trt_backend.optimization_profiles(1, 1, 8, 2, 64, 512)
    assert small.shapes["input_ids"].max == (2, 64)
    assert small.shapes["past_key.0"].max[2] == 128


def test_config_refuses_gpu_options_where_they_do_not_apply() -> None:
    out = Path("unused")
    with pytest.raises(BuildError, match="--dtype float16 is for the GPU backends"):
        BuildConfig(model="m", output=out, dtype="float16")
    with pytest.raises(BuildError, match="--onnx-only applies to --backend tensorrt"):
        BuildConfig(model="m", output=out, backend="onnxruntime-gpu", onnx_only=True)
    with pytest.raises(BuildError, match="drop --quantize"):
        BuildConfig(model="m", output=out, backend="tensorrt", quantize="int8")
    assert BuildConfig(model="m", output=out, backend="tensorrt").trt_attention == "auto"


def test_missing_tensorrt_is_one_line_naming_the_install() -> None:
    with pytest.raises(BackendUnavailableError) as info:
        trt_backend.find_tensorrt(names=("enginesmith_no_such_tensorrt",))
    message = str(info.value)
    assert "\n" not in message
    assert "pip install tensorrt-rtx-cu13" in message and "--onnx-only" in message


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU message")
def test_no_gpu_is_one_line() -> None:
    with pytest.raises(BackendUnavailableError, match="needs an NVIDIA GPU") as info:
        cuda.require_gpu("running a TensorRT engine")
    assert "\n" not in str(info.value)


def test_engine_built_elsewhere_is_refused_with_the_fix() -> None:
    entry = {
        "module": "tensorrt",
        "version": "11.4.0.106",
        "compute_capabilities": ["9.0"],
        "hardware_compatibility": "none",
        "version_compatible": False,
    }
    assert engine_incompatibility(entry, "tensorrt", "11.4.0.106", (9, 0)) is None
    other_gpu = engine_incompatibility(entry, "tensorrt", "11.4.0.106", (8, 9))
    assert other_gpu and "compute capability 9.0" in other_gpu and "this GPU is 8.9" in other_gpu
    other_version = engine_incompatibility(entry, "tensorrt", "11.5.0.1", (9, 0))
    assert other_version and "install 11.4.0.106" in other_version and "rebuild" in other_version
    other_family = engine_incompatibility(entry, "tensorrt_rtx", "1.7.1.116", (9, 0))
    assert other_family and "TensorRT-RTX" in other_family
    portable = {**entry, "hardware_compatibility": "ampere-plus", "version_compatible": True}
    assert engine_incompatibility(portable, "tensorrt", "11.5.0.1", (8, 6)) is None
    assert engine_incompatibility(portable, "tensorrt", "11.3.0", (8, 6)) is not None
    for why in (other_gpu, other_version, other_family):
        assert "\n" not in why


def test_onnx_only_engine_on_cpu(tiny_engine) -> None:  # type: ignore[no-untyped-def]
    """`build-engine --backend tensorrt --onnx-only` needs neither TensorRT nor a GPU; loading
    the result says what to do."""
    from enginesmith.runtime.engine_dir import read_manifest
    from enginesmith.runtime.executors import open_executor

    engine = tiny_engine(
        "tiny-llama", backend="tensorrt", onnx_only=True, max_seq_len=64, max_num_tokens=16
    )
    manifest = read_manifest(engine)
    assert manifest["backend"] == "tensorrt" and manifest["tensorrt"]["plan"] is None
    assert manifest["kv_cache"]["dtype"] == "float16"
    assert manifest["kv_cache"]["shape_per_layer"][2] == 80
    assert [p["name"] for p in manifest["tensorrt"]["profiles"]] == ["decode", "prefill"]
    onnx.checker.check_model(str(engine / "model.onnx"))
    with pytest.raises(EngineDirError, match="--onnx-only"):
        open_executor(engine, manifest)


@pytest.mark.skipif(
    not HAS_RTX, reason="TensorRT-RTX (pip install tensorrt-rtx-cu13) not installed"
)
@pytest.mark.parametrize("ops", ["trt", "onnx"])
def test_tensorrt_rtx_builds_the_plan_without_a_gpu(tmp_path: Path, ops: str) -> None:
    """TensorRT-RTX builds ahead of time on CPU: its real ONNX parser and builder accept the
    graph, both op sets, with both optimization profiles."""
    engine = build_quiet(
        "tiny-llama",
        tmp_path / "e",
        backend="tensorrt",
        trt_attention=ops,
        max_seq_len=64,
        max_num_tokens=16,
        verify=False,
    )
    plan = engine / "model.plan"
    assert plan.stat().st_size > 0


def test_steps_wider_than_the_engine_run_in_chunks(tiny_engine) -> None:  # type: ignore[no-untyped-def]
    """GPU sessions split a step wider than their largest step (quality.engine_logits prefills
    512 tokens at once); checked on the CPU session: the same logits and cache contents."""
    from enginesmith.runtime.engine_dir import read_manifest
    from enginesmith.runtime.executor import step_in_chunks
    from enginesmith.runtime.ort_cpu_executor import OrtCpuExecutor

    engine = tiny_engine("tiny-llama", max_seq_len=64)
    session = OrtCpuExecutor(engine, read_manifest(engine))
    rng = np.random.default_rng(0)
    seq = 20
    ids = rng.integers(3, 1000, (2, seq))
    past, valid = np.array([3, 0]), np.array([seq, 13])  # row 1 right-padded
    for slot in (0, 2):  # a prefix in slots 0 and 2 for row 0
        session.step(
            slot,
            ids[:1, :3],
            np.arange(3)[None],
            np.array([2], np.int32),
            np.array([3], np.int32),
            np.array([2]),
        )
    pos = past[:, None] + np.arange(seq)[None]
    seqk = (past + valid - 1).astype(np.int32)
    wanted = np.array([0, 7, seq - 1, seq + 12])
    whole = session.step(0, ids, pos, seqk, valid.astype(np.int32), wanted)
    chunked = step_in_chunks(session.step, 6, 2, ids, pos, seqk, valid.astype(np.int32), wanted)
    np.testing.assert_allclose(chunked, whole, atol=1e-4)
    for layer in range(session.num_layers):
        for row, total in enumerate(past + valid):
            np.testing.assert_allclose(
                session.cache_key[layer][2 + row, :, :total],
                session.cache_key[layer][row, :, :total],
                atol=1e-5,
            )


# -- on a GPU -------------------------------------------------------------------------------


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["tensorrt", "onnxruntime-gpu"])
def test_gpu_engine_matches_cpu_engine(tiny_engine, backend: str) -> None:  # type: ignore[no-untyped-def]
    """CPU twin: test_fp16_graph_matches_fp32_on_onnxruntime (and the lowering tests). The GPU
    engine's logits on a mixed prefill + decode sequence vs the fp32 CPU engine's."""
    from enginesmith.compiler import quality
    from enginesmith.runtime.engine_dir import read_manifest
    from enginesmith.runtime.executors import open_executor

    kwargs = {"max_seq_len": 128, "max_num_tokens": 32}  # 60 tokens: two prefill steps
    cpu_dir = tiny_engine("tiny-llama", **kwargs)
    gpu_dir = tiny_engine("tiny-llama", backend=backend, **kwargs)
    ids = list(np.random.default_rng(0).integers(3, 1000, 60))
    want = quality.engine_logits(open_executor(cpu_dir, read_manifest(cpu_dir)), ids)
    got = quality.engine_logits(open_executor(gpu_dir, read_manifest(gpu_dir)), ids)
    relative = float(np.abs(got - want).max() / np.abs(want).max())
    assert relative < FP16_RTOL, relative
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.95


@pytest.mark.gpu
@gpu
def test_gpu_greedy_generation_matches_cpu(tiny_engine) -> None:  # type: ignore[no-untyped-def]
    """CPU twin: tests/test_inflight.py (the same scheduler and sampler on the CPU engine). Three
    prompts in flight together through the TensorRT engine give the CPU engine's greedy text."""
    from enginesmith import LLM, SamplingParams

    kwargs = {"max_seq_len": 128, "max_num_tokens": 32}
    params = SamplingParams(max_tokens=16)
    want = LLM(tiny_engine("tiny-llama", **kwargs)).generate(list(PROMPTS), params)
    got = LLM(tiny_engine("tiny-llama", backend="tensorrt", **kwargs)).generate(
        list(PROMPTS), params
    )
    agree = np.mean(
        [
            a == b
            for w, g in zip(want, got, strict=True)
            for a, b in zip(w.token_ids, g.token_ids, strict=False)
        ]
    )
    assert agree > 0.9, agree
