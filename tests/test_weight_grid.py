"""Keeping a source's quantization grid (--quant-method auto): Q4_1 / Q8_0 weights are recovered
exactly, random weights are not mistaken for a grid, and the MatMulNBits + block-offset graph
computes the source's weights' product."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from enginesmith.compiler.config import BuildConfig
from enginesmith.passes import weight_grid
from enginesmith.passes.quantize_weights import QuantizeWeightsPass, dequantize_rows
from enginesmith.runtime.errors import BuildError


def q4_1_weight(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """[N, K] float32 as a GGUF Q4_1 file dequantizes it: fp16 d and m, w = d * q + m, each
    block's range spanning q = 0 .. 15."""
    kb = k // 32
    d = rng.uniform(0.002, 0.02, (n, kb)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-0.15, 0.0, (n, kb)).astype(np.float16).astype(np.float32)
    q = rng.integers(0, 16, (n, kb, 32))
    q[..., 0], q[..., 1] = 0, 15
    return (d[..., None] * q + m[..., None]).astype(np.float32).reshape(n, k)


def q8_0_weight(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    kb = k // 32
    d = rng.uniform(0.001, 0.01, (n, kb)).astype(np.float16).astype(np.float32)
    q = rng.integers(-127, 128, (n, kb, 32))
    q[..., 0] = 127
    return (d[..., None] * q).astype(np.float32).reshape(n, k)


def test_grids_are_recovered_exactly() -> None:
    rng = np.random.default_rng(0)
    w4, w8 = q4_1_weight(rng, 48, 96), q8_0_weight(rng, 48, 96)
    fit4, fit8 = weight_grid.fit_grid(w4, 4), weight_grid.fit_grid(w8, 8)
    assert fit4 is not None and fit4.offsets is not None and fit4.codes.max() <= 15
    assert fit8 is not None and fit8.offsets is None
    for w, fit in ((w4, fit4), (w8, fit8)):
        np.testing.assert_allclose(fit.dequantize(), w, rtol=0, atol=1e-6)


def test_random_weights_are_not_a_grid() -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 64)).astype(np.float32) * 0.05
    assert weight_grid.fit_grid(w, 4) is None
    assert weight_grid.fit_grid(w, 8) is None
    assert weight_grid.fit_grid(q4_1_weight(rng, 16, 64), 8) is None  # 16 levels != Q8_0
    assert weight_grid.fit_grid(w[:, :48], 4) is None  # K not a whole number of blocks


def matmul_model(w_kn: np.ndarray) -> ir.Model:
    k, n = w_kn.shape
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["B", "S", k]))
    weight = ir.Value(name="w", const_value=ir.tensor(w_kn, name="w"))
    node = ir.node("MatMul", [x, weight], name="proj")
    node.outputs[0].name = "y"
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    node.outputs[0].shape = ir.Shape(["B", "S", n])
    graph = ir.Graph(
        [x], [node.outputs[0]], nodes=[node], initializers=[weight], opset_imports={"": 21}
    )
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_kept_q4_1_grid_computes_the_source_product(accuracy_level: int) -> None:
    """MatMulNBits over the recovered codes plus the block-offset product equals x @ W (up to
    float rounding, or int8 activation rounding at accuracy level 4), and beats re-rounding."""
    rng = np.random.default_rng(2)
    w_nk = q4_1_weight(rng, 40, 128)
    x = rng.standard_normal((2, 3, 128)).astype(np.float32)
    expected = x @ w_nk.T
    errors = {}
    for keep in (True, False):
        model = matmul_model(np.ascontiguousarray(w_nk.T))
        rewrite = QuantizeWeightsPass(4, 32, True, accuracy_level, keep_grid=keep)
        rewrite(model)
        assert rewrite.report["kept_grid"] == ({"q4_1": 1} if keep else {})
        proto = ir.serde.serialize_model(model).SerializeToString()
        session = ort.InferenceSession(proto, providers=["CPUExecutionProvider"])
        errors[keep] = float(np.abs(session.run(None, {"x": x})[0] - expected).max())
    scale = float(np.abs(expected).max())
    if accuracy_level == 0:
        assert errors[True] < 1e-5 * scale, errors
    assert errors[True] < errors[False] / 4, errors


def test_dequantize_rows_includes_offsets() -> None:
    rng = np.random.default_rng(3)
    w = q4_1_weight(rng, 8, 64)
    fit = weight_grid.fit_grid(w, 4)
    assert fit is not None
    from enginesmith.passes.quantize_weights import from_grid

    np.testing.assert_allclose(dequantize_rows(from_grid(fit, 64)), w, atol=1e-6)


def test_bad_quant_method(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="--quant-method must be one of auto, rtn") as info:
        BuildConfig(model="tiny-llama", output=tmp_path / "e", quant_method="gptq")
    assert "\n" not in str(info.value)
