#!/usr/bin/env python3
"""Measure the KV-cache layout candidates for in-flight batching on ONNX Runtime CPU, in one run.

One attention layer of SmolLM2 shape (9 query heads, 3 KV heads, head_dim 64), a decode step of
B rows at different context lengths (mean ~256 tokens), cache capacity MAX varied:

  gqa-inplace : com.microsoft::GroupQueryAttention + query_seqlens, past/present bound to the
                same [B, 3, MAX, 64] buffer (what enginesmith builds)
  attn24-scatter : ONNX TensorScatter (in place, same binding) + Attention-24 with
                nonpad_kv_seqlen over the [B, 3, MAX, 64] buffer
  concat      : ONNX Attention-23 with past_key/past_value inputs; present = concat (a new
                [B, 3, ctx+1, 64] tensor every step; rows padded to the longest context)

Prints a table of median microseconds per call and writes JSON.
    .venv/bin/python scripts/measure_kv_layouts.py [--batch 4] [--calls 300]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

N, NKV, D = 9, 3, 64
F32, I32, I64 = ir.DataType.FLOAT, ir.DataType.INT32, ir.DataType.INT64


def value(name: str, dtype: ir.DataType, shape: list) -> ir.Value:  # type: ignore[type-arg]
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))


def session(
    nodes: list[ir.Node], inputs: list[ir.Value], outputs: list[ir.Value], opsets: dict[str, int]
) -> ort.InferenceSession:
    graph = ir.Graph(inputs, outputs, nodes=nodes, opset_imports=opsets)
    proto = ir.serde.serialize_model(ir.Model(graph, ir_version=10))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def gqa_model() -> ort.InferenceSession:
    ins = [
        value("q", F32, ["B", 1, N * D]),
        value("k", F32, ["B", 1, NKV * D]),
        value("v", F32, ["B", 1, NKV * D]),
        value("pk", F32, ["B", NKV, "M", D]),
        value("pv", F32, ["B", NKV, "M", D]),
        value("seqlens_k", I32, ["B"]),
        value("total", I32, []),
        value("qlens", I32, ["B"]),
    ]
    args = ins[:7] + [None] * 9 + [ins[7]]
    node = ir.node(
        "GroupQueryAttention",
        args,
        {"num_heads": N, "kv_num_heads": NKV},
        domain="com.microsoft",
        num_outputs=3,
    )
    for o, name in zip(node.outputs, ["out", "prk", "prv"], strict=True):
        o.name, o.type = name, ir.TensorType(F32)
    return session([node], ins, list(node.outputs), {"": 24, "com.microsoft": 1})


def scatter_model() -> ort.InferenceSession:
    ins = [
        value("q", F32, ["B", N, 1, D]),
        value("k", F32, ["B", NKV, 1, D]),
        value("v", F32, ["B", NKV, 1, D]),
        value("pk", F32, ["B", NKV, "M", D]),
        value("pv", F32, ["B", NKV, "M", D]),
        value("write", I64, ["B"]),
        value("nonpad", I64, ["B"]),
    ]
    sk = ir.node("TensorScatter", [ins[3], ins[1], ins[5]], {"axis": 2})
    sv = ir.node("TensorScatter", [ins[4], ins[2], ins[5]], {"axis": 2})
    sk.outputs[0].name, sv.outputs[0].name = "prk", "prv"
    for o in (sk.outputs[0], sv.outputs[0]):
        o.type = ir.TensorType(F32)
    att = ir.node(
        "Attention",
        [ins[0], sk.outputs[0], sv.outputs[0], None, None, None, ins[6]],
        {"is_causal": 1},
        num_outputs=1,
    )
    att.outputs[0].name, att.outputs[0].type = "out", ir.TensorType(F32)
    return session([sk, sv, att], ins, [att.outputs[0], sk.outputs[0], sv.outputs[0]], {"": 24})


def concat_model() -> ort.InferenceSession:
    ins = [
        value("q", F32, ["B", N, 1, D]),
        value("k", F32, ["B", NKV, 1, D]),
        value("v", F32, ["B", NKV, 1, D]),
        value("pk", F32, ["B", NKV, "P", D]),
        value("pv", F32, ["B", NKV, "P", D]),
    ]
    att = ir.node("Attention", [*ins[:3], None, *ins[3:]], {"is_causal": 1}, num_outputs=3)
    for o, name in zip(att.outputs, ["out", "prk", "prv"], strict=True):
        o.name, o.type = name, ir.TensorType(F32)
    return session([att], ins, list(att.outputs), {"": 23})


def time_calls(run, calls: int) -> float:  # type: ignore[no-untyped-def]
    for _ in range(10):
        run()
    samples = []
    for _ in range(calls):
        t = time.perf_counter()
        run()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4, help="rows per decode step (default: 4)")
    parser.add_argument(
        "--calls", type=int, default=300, help="timed calls per cell (default: 300)"
    )
    parser.add_argument(
        "--json", default=None, help="write results here (default: cache bench folder)"
    )
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    b = args.batch
    ctx = np.linspace(200, 312, b).astype(np.int64)  # different lengths per row, mean 256
    q_bsd = rng.standard_normal((b, 1, N * D), dtype=np.float32)
    k_bsd = rng.standard_normal((b, 1, NKV * D), dtype=np.float32)
    models = {
        "gqa-inplace": gqa_model(),
        "attn24-scatter": scatter_model(),
        "concat": concat_model(),
    }
    results: dict[str, dict[int, float]] = {name: {} for name in models}
    for cap in (512, 2048, 4096):
        cache_k = rng.standard_normal((b, NKV, cap, D), dtype=np.float32)
        cache_v = rng.standard_normal((b, NKV, cap, D), dtype=np.float32)
        ok, ov = (
            ort.OrtValue.ortvalue_from_numpy(cache_k),
            ort.OrtValue.ortvalue_from_numpy(cache_v),
        )

        def gqa() -> None:
            io = models["gqa-inplace"].io_binding()
            io.bind_cpu_input("q", q_bsd)
            io.bind_cpu_input("k", k_bsd)
            io.bind_cpu_input("v", k_bsd)
            io.bind_ortvalue_input("pk", ok)
            io.bind_ortvalue_input("pv", ov)
            io.bind_cpu_input("seqlens_k", ctx.astype(np.int32))
            io.bind_cpu_input("total", np.array(cap, np.int32))
            io.bind_cpu_input("qlens", np.ones(b, np.int32))
            io.bind_output("out", "cpu")
            io.bind_ortvalue_output("prk", ok)
            io.bind_ortvalue_output("prv", ov)
            models["gqa-inplace"].run_with_iobinding(io)

        def scatter() -> None:
            io = models["attn24-scatter"].io_binding()
            io.bind_cpu_input("q", q_bsd.reshape(b, 1, N, D).transpose(0, 2, 1, 3).copy())
            io.bind_cpu_input("k", k_bsd.reshape(b, 1, NKV, D).transpose(0, 2, 1, 3).copy())
            io.bind_cpu_input("v", k_bsd.reshape(b, 1, NKV, D).transpose(0, 2, 1, 3).copy())
            io.bind_ortvalue_input("pk", ok)
            io.bind_ortvalue_input("pv", ov)
            io.bind_cpu_input("write", ctx)
            io.bind_cpu_input("nonpad", ctx + 1)
            io.bind_output("out", "cpu")
            io.bind_ortvalue_output("prk", ok)
            io.bind_ortvalue_output("prv", ov)
            models["attn24-scatter"].run_with_iobinding(io)

        past = int(ctx.max())  # concat needs equal lengths: rows padded to the longest
        pk, pv = cache_k[:, :, :past].copy(), cache_v[:, :, :past].copy()
        feeds = {
            "q": q_bsd.reshape(b, 1, N, D).transpose(0, 2, 1, 3).copy(),
            "k": k_bsd.reshape(b, 1, NKV, D).transpose(0, 2, 1, 3).copy(),
            "pk": pk,
            "pv": pv,
        }
        feeds["v"] = feeds["k"]

        def concat() -> None:
            models["concat"].run(None, feeds)

        for name, fn in (("gqa-inplace", gqa), ("attn24-scatter", scatter), ("concat", concat)):
            results[name][cap] = time_calls(fn, args.calls)
    caps = [512, 2048, 4096]
    print(
        f"one attention layer, SmolLM2 shape (9 q heads, 3 kv heads, dim 64), decode of {b} rows at "
        f"contexts {ctx.tolist()}: median us per call ({args.calls} calls)\n"
    )
    print(f"{'layout':<16}" + "".join(f"{'MAX=' + str(c):>12}" for c in caps))
    for name, row in results.items():
        print(f"{name:<16}" + "".join(f"{row[c]:>12.1f}" for c in caps))
    print("\n(concat does not depend on MAX: it always holds exactly the padded context)")
    from enginesmith.runtime.bench import save_results

    record = {"batch": b, "contexts": ctx.tolist(), "us_per_call": results}
    path = save_results(record, Path(args.json) if args.json else None, "kv-layouts")
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
