"""GPU verification of the GPU backends (run by scripts/gpu-verify on a machine with a GPU).

Steps, each recorded in OUT/gpu_verify.json even when it fails (a failure is a finding):
  environment  GPU, compute capability, driver-side libraries, TensorRT and ONNX Runtime
  build        SmolLM2 engines: tensorrt (TRT_* ops), tensorrt (standard ops: the graph ONNX
               Runtime also runs), onnxruntime-gpu; each build checks its logits against
               transformers (build_report.json "verify")
  polygraphy   per-output comparison (logits, every present_* cache) of the TensorRT plan
               against ONNX Runtime on the same model.onnx, for a prefill step and a mixed
               decode step; also the TRT_* plan against the same ONNX Runtime reference
  greedy       greedy tokens of each engine vs transformers' generate(do_sample=False) on CUDA
  bench        prefill tok/s, batch-1 decode tok/s and batched throughput, each engine (and
               TensorRT with CUDA graphs for decode) next to transformers on CUDA, in one run
Prints one table per step at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from enginesmith.runtime.errors import EnginesmithError

PROMPTS = (
    "The three primary colors are",
    "def fibonacci(n):",
    "In a distant galaxy, a small robot",
)
# polygraphy tolerances per output: logits (fp32 out of an fp16 network) and the fp16 caches.
LOGITS_TOL = {"atol": 0.25, "rtol": 0.05}
CACHE_TOL = {"atol": 0.02, "rtol": 0.02}


def _step(results: dict[str, Any], name: str, fn: Callable[[], Any]) -> Any:
    print(f"[gpu-verify] {name} ...", flush=True)
    start = time.perf_counter()
    try:
        value = fn()
        results[name] = {"ok": True, "seconds": round(time.perf_counter() - start, 2), **value}
    except Exception as exc:  # every step runs; a failure is recorded with its one-line reason
        results[name] = {
            "ok": False,
            "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            "traceback": traceback.format_exc(limit=6),
        }
        print(f"[gpu-verify] {name} FAILED: {results[name]['error']}", flush=True)
        return None
    return results[name]


# -- environment ----------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    from enginesmith.runtime import cuda
    from enginesmith.runtime.tensorrt_lib import find_tensorrt

    env: dict[str, Any] = {"gpus": cuda.device_count()}
    if env["gpus"]:
        env["gpu"] = cuda.device_name()
        major, minor = cuda.compute_capability()
        env["compute_capability"] = f"{major}.{minor}"
    try:
        found = find_tensorrt()
        env["tensorrt"] = {"module": found.name, "version": found.version}
    except EnginesmithError as exc:
        env["tensorrt"] = {"error": str(exc)}
    import onnxruntime as ort

    env["onnxruntime"] = {"version": ort.__version__, "providers": ort.get_available_providers()}
    try:
        import torch

        env["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda}
    except ImportError:
        env["torch"] = None
    return env


# -- engines --------------------------------------------------------------------------------

ENGINES = {
    # name: build-engine options
    "trt": {"backend": "tensorrt", "trt_attention": "trt"},
    "trt-onnxops": {"backend": "tensorrt", "trt_attention": "onnx"},
    "ort-cuda": {"backend": "onnxruntime-gpu"},
}


def build_engines(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from enginesmith.compiler.build import build
    from enginesmith.compiler.config import BuildConfig

    out: dict[str, Any] = {}
    for name, options in ENGINES.items():
        if name in args.skip:
            continue
        config = BuildConfig(
            model=args.model,
            output=root / name,
            max_batch=args.max_batch,
            max_seq_len=args.max_seq_len,
            max_num_tokens=args.max_num_tokens,
            dtype=args.dtype,
            force=True,
            **options,  # type: ignore[arg-type]
        )
        start = time.perf_counter()
        try:
            manifest = build(config, log=lambda msg: print(f"      {msg}", flush=True))
        except Exception as exc:
            out[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            continue
        report = json.loads((root / name / "build_report.json").read_text())
        out[name] = {
            "ok": True,
            "seconds": round(time.perf_counter() - start, 1),
            "verify": report.get("verify"),
            "tensorrt": {
                k: v for k, v in (manifest.get("tensorrt") or {}).items() if k != "profiles"
            },
            "plan_mb": round((root / name / "model.plan").stat().st_size / 1e6, 1)
            if (root / name / "model.plan").exists()
            else None,
        }
    return out


# -- polygraphy -----------------------------------------------------------------------------


def _feeds(manifest: dict[str, Any], seed: int) -> list[dict[str, np.ndarray]]:
    """A prefill step (one row, S tokens, empty cache) and a mixed decode step (every slot at
    its own length, one idle row), caches as fp16 host arrays."""
    rng = np.random.default_rng(seed)
    model, kv = manifest["model"], manifest["kv_cache"]
    layers, vocab = model["num_layers"], model["vocab_size"]
    batch, max_seq = manifest["max_batch"], manifest["max_seq_len"]
    shape = tuple(kv["shape_per_layer"])
    s = min(32, manifest["max_step_tokens"])

    def caches(rows: int, scale: float) -> dict[str, np.ndarray]:
        return {
            f"past_{kind}.{i}": (rng.standard_normal((rows, *shape[1:])) * scale).astype(np.float16)
            for i in range(layers)
            for kind in ("key", "value")
        }

    prefill = {
        "input_ids": rng.integers(0, vocab, (1, s)),
        "position_ids": np.arange(s)[None],
        "logits_indices": np.array([s - 1]),
        "seqlens_k": np.array([s - 1], np.int32),
        "query_seqlens": np.array([s], np.int32),
        **caches(1, 0.0),
    }
    past = rng.integers(1, max_seq - 1, batch)
    valid = np.ones(batch, np.int32)
    valid[-1] = 0  # an idle row
    decode = {
        "input_ids": rng.integers(0, vocab, (batch, 1)),
        "position_ids": past[:, None],
        "logits_indices": np.arange(batch - 1),  # not the idle row's
        "seqlens_k": np.where(valid > 0, past, 0).astype(np.int32),
        "query_seqlens": valid,
        **caches(batch, 0.5),
    }
    return [prefill, decode]


class AliasedTrtRunner:
    """A polygraphy runner for a plan whose present_* outputs alias their past_* inputs (the
    KV-update layers write in place, so polygraphy's own TrtRunner, which gives every output
    its own buffer, cannot run it)."""

    def __new__(cls, plan: Path, name: str) -> Any:
        from polygraphy.backend.base import BaseRunner
        from polygraphy.common import TensorMetadata

        from enginesmith.runtime import cuda
        from enginesmith.runtime.tensorrt_lib import find_tensorrt

        class Runner(BaseRunner):  # type: ignore[misc]
            def activate_impl(self) -> None:
                self.trt = trt = find_tensorrt().module
                self.logger = trt.Logger(trt.Logger.ERROR)
                self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(plan.read_bytes())
                self.contexts = [
                    self.engine.create_execution_context()
                    for _ in range(self.engine.num_optimization_profiles)
                ]
                self.stream = cuda.Stream()
                for i, context in enumerate(self.contexts):
                    context.set_optimization_profile_async(i, self.stream.ptr)

            def get_input_metadata_impl(self) -> Any:
                meta, engine, trt = TensorMetadata(), self.engine, self.trt
                for i in range(engine.num_io_tensors):
                    name = engine.get_tensor_name(i)
                    if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                        shape = [None if d < 0 else d for d in engine.get_tensor_shape(name)]
                        meta.add(name, trt.nptype(engine.get_tensor_dtype(name)), shape)
                return meta

            def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                seq = feed_dict["input_ids"].shape[1]
                context = self.contexts[0 if seq == 1 else 1]
                buffers, outputs = {}, {}
                for name, array in feed_dict.items():
                    array = np.ascontiguousarray(array)
                    buffers[name] = cuda.DeviceBuffer(max(array.nbytes, 1))
                    buffers[name].upload(array, self.stream)
                    context.set_input_shape(name, array.shape)
                    context.set_tensor_address(name, buffers[name].ptr)
                    if name.startswith("past_"):  # in place: present_* = the same memory
                        present = name.replace("past_", "present_")
                        context.set_tensor_address(present, buffers[name].ptr)
                        outputs[present] = (name, array.shape, array.dtype)
                m = len(feed_dict["logits_indices"])
                vocab = self.engine.get_tensor_shape("logits")[1]
                logits = cuda.DeviceBuffer(m * vocab * 4)
                context.set_tensor_address("logits", logits.ptr)
                start = time.perf_counter()
                if not context.execute_async_v3(self.stream.ptr):
                    raise RuntimeError("execute_async_v3 failed")
                result = {"logits": logits.download(np.empty((m, vocab), np.float32), self.stream)}
                for present, (past, shape, dtype) in outputs.items():
                    result[present] = buffers[past].download(np.empty(shape, dtype), self.stream)
                self.stream.synchronize()
                self.inference_time = time.perf_counter() - start
                return result

            def deactivate_impl(self) -> None:
                del self.contexts, self.engine, self.stream

        return Runner(name=name)


def polygraphy_compare(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, CompareFunc

    from enginesmith.runtime.engine_dir import read_manifest

    reference_dir = root / "trt-onnxops"
    manifest = read_manifest(reference_dir)
    import onnxruntime as ort

    providers = (
        ["CUDAExecutionProvider"]
        if "CUDAExecutionProvider" in ort.get_available_providers()
        else ["CPUExecutionProvider"]
    )
    onnx_runner = OnnxrtRunner(
        SessionFromOnnx(str(reference_dir / "model.onnx"), providers=providers),
        name=f"onnxruntime-{providers[0][:-17].lower() or 'cpu'}",
    )
    atol = {"logits": LOGITS_TOL["atol"], "": CACHE_TOL["atol"]}
    rtol = {"logits": LOGITS_TOL["rtol"], "": CACHE_TOL["rtol"]}
    out: dict[str, Any] = {"reference": onnx_runner.name, "atol": atol, "rtol": rtol}
    for engine in ("trt-onnxops", "trt"):
        if not (root / engine / "model.plan").exists():
            out[engine] = {"ok": False, "error": "no plan built"}
            continue
        runners = [
            AliasedTrtRunner(root / engine / "model.plan", f"tensorrt-{engine}"),
            onnx_runner,
        ]
        results = Comparator.run(runners, data_loader=_feeds(manifest, args.seed))
        accuracy = Comparator.compare_accuracy(
            results, compare_func=CompareFunc.simple(atol=atol, rtol=rtol, check_shapes=True)
        )
        worst: dict[str, float] = {}
        for run_a, run_b in zip(*results.values(), strict=True):
            for name, a in run_a.items():
                b = run_b[name]
                if name.startswith("present_") or name == "logits":
                    key = "logits" if name == "logits" else "caches"
                    diff = float(
                        np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max()
                    )
                    worst[key] = max(worst.get(key, 0.0), diff)
        out[engine] = {"ok": bool(accuracy), "max_abs_diff": worst}
    return out


# -- greedy and speed -----------------------------------------------------------------------


def _hf_model(args: argparse.Namespace) -> Any:
    import torch

    from enginesmith.compiler.sources import load_model

    loaded = load_model(args.model)
    dtype = torch.float16 if args.dtype in (None, "float16") else torch.bfloat16
    return loaded, loaded.model.to("cuda", dtype=dtype).eval()


def greedy(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    import torch

    from enginesmith import LLM, SamplingParams

    loaded, model = _hf_model(args)
    reference = []
    for prompt in PROMPTS:
        ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids.to("cuda")
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=args.tokens, do_sample=False)
        reference.append(out[0, ids.shape[1] :].tolist())
    result: dict[str, Any] = {"tokens": args.tokens}
    for engine in ENGINES:
        if not (root / engine / "manifest.json").exists():
            continue
        try:
            outs = LLM(root / engine).generate(
                list(PROMPTS), SamplingParams(max_tokens=args.tokens)
            )
        except Exception as exc:
            result[engine] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            continue
        rows = []
        for want, got in zip(reference, outs, strict=True):
            same = [a == b for a, b in zip(want, got.token_ids, strict=False)]
            first = same.index(False) if False in same else len(same)
            rows.append({"first_divergence": first, "agreement": float(np.mean(same))})
        result[engine] = {"ok": True, "prompts": rows}
    return result


def bench(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    import torch

    from enginesmith import LLM, SamplingParams

    prompt_len = min(512, args.max_num_tokens, args.max_seq_len - args.tokens - 1)
    rng = np.random.default_rng(args.seed)
    result: dict[str, Any] = {"prompt_tokens": prompt_len, "decode_tokens": args.tokens}
    runs: list[tuple[str, Path, dict[str, str]]] = []
    for engine in ENGINES:
        if (root / engine / "manifest.json").exists():
            runs.append((engine, root / engine, {}))
    if (root / "trt" / "manifest.json").exists():
        runs.append(("trt+cudagraph", root / "trt", {"ENGINESMITH_CUDA_GRAPHS": "1"}))
    for label, engine_dir, env in runs:
        os.environ.update(env)
        try:
            llm = LLM(engine_dir)
            vocab = llm.executor.vocab_size
            ids = rng.integers(3, vocab, (1, prompt_len))
            zero = np.zeros(1, np.int32)

            prefill_args = (
                0,
                ids,
                np.arange(prompt_len)[None],
                zero + prompt_len - 1,
                zero + prompt_len,
                np.array([prompt_len - 1]),
            )
            llm.executor.step(*prefill_args)  # warm-up
            start = time.perf_counter()
            for _ in range(5):
                llm.executor.step(*prefill_args)
            prefill = 5 * prompt_len / (time.perf_counter() - start)
            params = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
            one = llm.generate(PROMPTS[0], params)[0]
            start = time.perf_counter()
            outs = llm.generate([PROMPTS[i % len(PROMPTS)] for i in range(args.max_batch)], params)
            batched = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)
            result[label] = {
                "prefill_tok_s": round(prefill, 1),
                "decode_tok_s_batch1": round(one.stats.decode_tokens_per_s, 1),
                f"throughput_tok_s_batch{args.max_batch}": round(batched, 1),
            }
        except Exception as exc:
            result[label] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            for key in env:
                os.environ.pop(key, None)
    result["transformers-cuda"] = _bench_transformers(args, prompt_len, torch)
    return result


def _bench_transformers(args: argparse.Namespace, prompt_len: int, torch: Any) -> dict[str, Any]:
    loaded, model = _hf_model(args)
    ids = torch.randint(3, model.config.vocab_size, (1, prompt_len), device="cuda")

    def timed(fn: Callable[[], Any], repeat: int = 1) -> float:
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeat

    with torch.no_grad():
        prefill = prompt_len / timed(lambda: model(ids), 5)
        short = loaded.tokenizer(PROMPTS[0], return_tensors="pt").input_ids.to("cuda")
        kwargs = {"max_new_tokens": args.tokens, "min_new_tokens": args.tokens, "do_sample": False}
        decode = args.tokens / timed(lambda: model.generate(short, **kwargs))
        loaded.tokenizer.padding_side = "left"
        if loaded.tokenizer.pad_token is None:
            loaded.tokenizer.pad_token = loaded.tokenizer.eos_token
        batch = loaded.tokenizer(
            [PROMPTS[i % len(PROMPTS)] for i in range(args.max_batch)],
            return_tensors="pt",
            padding=True,
        ).to("cuda")
        batched = args.max_batch * args.tokens / timed(lambda: model.generate(**batch, **kwargs))
    return {
        "prefill_tok_s": round(prefill, 1),
        "decode_tok_s_batch1": round(decode, 1),
        f"throughput_tok_s_batch{args.max_batch}": round(batched, 1),
    }


# -- main -----------------------------------------------------------------------------------


def _table(results: dict[str, Any]) -> list[str]:
    lines = []
    env = results.get("environment", {})
    lines.append(
        f"GPU {env.get('gpu')} (cc {env.get('compute_capability')}), TensorRT {env.get('tensorrt')}"
    )
    for engine, row in (results.get("build") or {}).items():
        if isinstance(row, dict) and "ok" in row and engine not in ("ok", "seconds"):
            verify = (row.get("verify") or {}) if row.get("ok") else {}
            diff = verify.get("relative_diff")
            detail = row.get("error") or (f"relative diff {diff:.2e}" if diff is not None else "")
            lines.append(f"build {engine:<14} {'ok' if row['ok'] else 'FAILED'}  {detail}")
    for engine, row in (results.get("polygraphy") or {}).items():
        if isinstance(row, dict) and "max_abs_diff" in row:
            lines.append(
                f"polygraphy {engine:<14} {'PASS' if row['ok'] else 'FAIL'} {row['max_abs_diff']}"
            )
    for engine, row in (results.get("greedy") or {}).items():
        if isinstance(row, dict) and "prompts" in row:
            lines.append(
                f"greedy {engine:<14} first divergence "
                f"{[p['first_divergence'] for p in row['prompts']]} of {results['greedy']['tokens']}"
            )
    bench_rows = results.get("bench") or {}
    for engine, row in bench_rows.items():
        if isinstance(row, dict) and engine not in ("ok",):
            lines.append(f"bench {engine:<18} {row}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu-verify", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/gpu-verify"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", choices=("float16", "bfloat16"), default=None)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--max-num-tokens", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=64, help="generated tokens per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", nargs="*", default=[], help="engines or steps to skip")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    root = args.out / "engines"
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    _step(results, "environment", environment)
    steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("build", lambda: build_engines(args, root)),
        ("polygraphy", lambda: polygraphy_compare(args, root)),
        ("greedy", lambda: greedy(args, root)),
        ("bench", lambda: bench(args, root)),
    ]
    for name, fn in steps:
        if name not in args.skip:
            _step(results, name, fn)
        (args.out / "gpu_verify.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(_table(results)))
    print(f"[gpu-verify] results: {args.out / 'gpu_verify.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
