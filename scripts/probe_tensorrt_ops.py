"""Which attention / KV-update graphs TensorRT (or TensorRT-RTX) builds: single-layer probes.

TensorRT-RTX builds ahead of time without a GPU, so this runs on a CPU machine too:
    pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings
    .venv/bin/python scripts/probe_tensorrt_ops.py [SM86,SM89,...]
Prints one line per (op form, dtype, target): BUILT or the builder's first error line.
docs/tensorrt.md records the results.
"""

from __future__ import annotations

import importlib
import itertools
import sys
from typing import Any

from onnx import TensorProto as TP
from onnx import helper as h

B, H, KH, MAX, D = 2, 8, 2, 64, 64


def trt_module():  # type: ignore[no-untyped-def]
    for name in ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    sys.exit("no TensorRT: pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings")


def build(trt, model, profiles, target) -> str:  # type: ignore[no-untyped-def]
    errors: list[str] = []

    class Logger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity, msg) -> None:  # type: ignore[no-untyped-def]
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                errors.append(msg)

    logger = Logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString()):
        return "PARSE FAILED: " + parser.get_error(0).desc()
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, shapes in profiles.items():
        profile.set_shape(name, *shapes)
    config.add_optimization_profile(profile)
    if target is not None:
        config.num_compute_capabilities = 1
        config.set_compute_capability(target, 0)
    built = builder.build_serialized_network(network, config)
    if built is not None:
        return "BUILT"
    return "FAILED: " + (errors[-1].splitlines()[0][:200] if errors else "?")


def kv_profiles(rows_q: tuple, rows_k: tuple) -> dict:  # type: ignore[type-arg]
    cache = ((1, KH, MAX, D), (2, KH, MAX, D), (4, KH, MAX, D))
    return {"q": rows_q, "k": rows_k, "v": rows_k, "past_key": cache, "past_value": cache}


def onnx_ops(dtype: int, mask: bool) -> tuple[Any, dict[str, Any]]:
    """TensorScatter-24 + Attention (optionally with a bool mask)."""
    nodes = [
        h.make_node("TensorScatter", ["past_key", "k", "widx"], ["present_key"], axis=-2),
        h.make_node("TensorScatter", ["past_value", "v", "widx"], ["present_value"], axis=-2),
        h.make_node(
            "Attention", ["q", "present_key", "present_value"] + (["mask"] if mask else []), ["y"]
        ),
    ]
    inputs = [
        h.make_tensor_value_info("q", dtype, ["b", H, "s", D]),
        h.make_tensor_value_info("k", dtype, ["b", KH, "s", D]),
        h.make_tensor_value_info("v", dtype, ["b", KH, "s", D]),
        h.make_tensor_value_info("past_key", dtype, ["b", KH, MAX, D]),
        h.make_tensor_value_info("past_value", dtype, ["b", KH, MAX, D]),
        h.make_tensor_value_info("widx", TP.INT64, ["b"]),
    ]
    q = ((1, H, 1, D), (2, H, 4, D), (4, H, 8, D))
    profiles = {
        **kv_profiles(q, ((1, KH, 1, D), (2, KH, 4, D), (4, KH, 8, D))),
        "widx": ((1,), (2,), (4,)),
    }
    if mask:
        inputs.append(h.make_tensor_value_info("mask", TP.BOOL, ["b", 1, "s", MAX]))
        profiles["mask"] = ((1, 1, 1, MAX), (2, 1, 4, MAX), (4, 1, 8, MAX))
    outputs = [
        h.make_tensor_value_info("y", dtype, ["b", H, "s", D]),
        h.make_tensor_value_info("present_key", dtype, ["b", KH, MAX, D]),
        h.make_tensor_value_info("present_value", dtype, ["b", KH, MAX, D]),
    ]
    graph = h.make_graph(nodes, "probe", inputs, outputs)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 24)]), profiles


def trt_ops(dtype: int, query_form: str) -> tuple[Any, dict[str, Any]]:
    """TRT_KVCacheUpdate + TRT_Attention, padded or packed queries, padded KV + kv_lengths."""
    packed = query_form == "packed_nhd"
    extra = ["cu"] if packed else []
    nodes = [
        *(
            h.make_node(
                "TRT_KVCacheUpdate",
                [f"past_{kind}", new, "widx", *extra],
                [f"present_{kind}"],
                update_form=query_form,
                domain="trt",
            )
            for kind, new in (("key", "k"), ("value", "v"))
        ),
        h.make_node(
            "TRT_Attention",
            ["q", "present_key", "present_value", "", "cu" if packed else "", "kvlen"],
            ["y"],
            query_form=query_form,
            kv_form="padded_bhnd",
            causal_kind="lower_right",
            domain="trt",
        ),
    ]
    qs: list[Any]
    ks: list[Any]
    q: tuple[tuple[int, ...], ...]
    k: tuple[tuple[int, ...], ...]
    if packed:
        qs, ks = ["t", H, D], ["t", KH, D]
        q, k = ((1, H, D), (8, H, D), (32, H, D)), ((1, KH, D), (8, KH, D), (32, KH, D))
    else:
        qs, ks = ["b", H, "s", D], ["b", KH, "s", D]
        q, k = (
            ((1, H, 1, D), (2, H, 4, D), (4, H, 8, D)),
            ((1, KH, 1, D), (2, KH, 4, D), (4, KH, 8, D)),
        )
    profiles = {**kv_profiles(q, k), "widx": ((1,), (2,), (4,)), "kvlen": ((1,), (2,), (4,))}
    inputs = [
        h.make_tensor_value_info("q", dtype, qs),
        h.make_tensor_value_info("k", dtype, ks),
        h.make_tensor_value_info("v", dtype, ks),
        h.make_tensor_value_info("past_key", dtype, ["b", KH, MAX, D]),
        h.make_tensor_value_info("past_value", dtype, ["b", KH, MAX, D]),
        h.make_tensor_value_info("widx", TP.INT32, ["b"]),
        h.make_tensor_value_info("kvlen", TP.INT32, ["b"]),
    ]
    if packed:
        inputs.append(h.make_tensor_value_info("cu", TP.INT32, ["b1"]))
        profiles["cu"] = ((2,), (3,), (5,))
    outputs = [
        h.make_tensor_value_info("y", dtype, qs),
        h.make_tensor_value_info("present_key", dtype, ["b", KH, MAX, D]),
        h.make_tensor_value_info("present_value", dtype, ["b", KH, MAX, D]),
    ]
    graph = h.make_graph(nodes, "probe", inputs, outputs)
    opsets = [h.make_opsetid("", 24), h.make_opsetid("trt", 1)]
    return h.make_model(graph, opset_imports=opsets), profiles


def main() -> None:
    trt = trt_module()
    print(f"{trt.__name__} {trt.__version__}")
    names = sys.argv[1].split(",") if len(sys.argv) > 1 else ["SM86"]
    targets = (
        [getattr(trt.ComputeCapability, n) for n in names]
        if hasattr(trt, "ComputeCapability")
        else [None]
    )
    for target, (dtype, dname) in itertools.product(
        targets, ((TP.FLOAT16, "fp16"), (TP.BFLOAT16, "bf16"))
    ):
        tag = target.name if target is not None else "gpu"
        for mask in (False, True):
            print(
                f"{tag} {dname} TensorScatter+Attention mask={mask}:",
                build(trt, *onnx_ops(dtype, mask), target),
            )
        for form in ("padded_bhnd", "packed_nhd"):
            print(
                f"{tag} {dname} TRT_KVCacheUpdate+TRT_Attention q={form}:",
                build(trt, *trt_ops(dtype, form), target),
            )


if __name__ == "__main__":
    main()
