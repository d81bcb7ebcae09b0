"""The MatMul floor of a decode step: the engine's own weight MatMuls (same shapes, same
order, same ONNX Runtime kernels and threads) chained one after another at batch 1, with
nothing else in the graph. No engine built from these kernels can decode faster, so it says how
much of the gap to the bandwidth bound is the rest of the graph and how much the MatMul kernels
themselves."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def weight_matmul_shapes(model_path: Path) -> list[tuple[int, int]]:
    """(K, N) of every fp32 MatMul / Gemm with a constant weight, in graph order."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    dims = {
        t.name: list(t.dims) for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT
    }
    shapes = []
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or node.input[1] not in dims:
            continue
        k, n = dims[node.input[1]]
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        shapes.append((n, k) if trans_b else (k, n))
    return shapes


class MatMulFloor:
    """One ONNX Runtime session: x @ W_1 -> slice/pad to K_2 -> @ W_2 -> ... (random weights)."""

    def __init__(self, shapes: list[tuple[int, int]], seed: int = 0) -> None:
        import onnx
        import onnxruntime as ort
        from onnx import helper, numpy_helper

        rng = np.random.default_rng(seed)
        nodes, inits = [], []
        x = "x"
        for i, (k, n) in enumerate(shapes):
            if i:  # adapt the previous output [1, 1, N_prev] to K: Slice, or Pad with zeros
                prev_n = shapes[i - 1][1]
                if prev_n >= k:
                    for name, v in (("s", 0), ("e", k), ("a", -1)):
                        inits.append(numpy_helper.from_array(np.array([v], np.int64), f"{name}{i}"))
                    nodes.append(
                        helper.make_node("Slice", [x, f"s{i}", f"e{i}", f"a{i}"], [f"in{i}"])
                    )
                else:
                    pads = np.array([0, 0, 0, 0, 0, k - prev_n], np.int64)
                    inits.append(numpy_helper.from_array(pads, f"p{i}"))
                    nodes.append(helper.make_node("Pad", [x, f"p{i}"], [f"in{i}"]))
                x = f"in{i}"
            # Unit-variance activations all the way: no denormals to slow the kernels down.
            weight = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
            inits.append(numpy_helper.from_array(weight, f"w{i}"))
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"]))
            x = f"y{i}"
        graph = helper.make_graph(
            nodes,
            "matmul_floor",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, shapes[0][0]])],
            [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None)],
            inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        self.input = rng.standard_normal((1, 1, shapes[0][0])).astype(np.float32)
        self.weight_bytes = sum(4 * k * n for k, n in shapes)

    def tokens_per_s(self, steps: int = 64) -> float:
        """Steps per second (one step = every MatMul once), median of STEPS after a warm-up."""
        for _ in range(3):
            self.session.run(None, {"x": self.input})
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            self.session.run(None, {"x": self.input})
            times.append(time.perf_counter() - start)
        return 1.0 / float(np.median(times))
