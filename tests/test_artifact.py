"""Engine directories: manifest contents, file hashes, build report, relocation and `inspect`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import enginesmith
from enginesmith.compiler import artifact, presets
from enginesmith.compiler.config import BuildConfig

ENGINESMITH = Path(sys.executable).parent / "enginesmith"
PRESET = "tiny-llama"
# The build's verify stage on PRESET measures max |diff| ~3e-6, relative ~7e-7: 10x margin.
VERIFY_ABS_LIMIT = 3e-5
VERIFY_RELATIVE_LIMIT = 1e-5
PROMPTS = (
    "def fibonacci(n):",
    "The quick brown fox jumps over the lazy dog.",
    "In the beginning the Universe was created.",
)


@pytest.fixture(scope="module")
def engine(tiny_engine) -> Path:  # type: ignore[no-untyped-def]
    return tiny_engine(PRESET)


@pytest.fixture(scope="module")
def manifest(engine: Path) -> dict:
    return artifact.read_manifest(engine)  # verifies every listed hash


@pytest.fixture(scope="module")
def hf_config() -> dict:
    """The source model's own config.json: an independent record of its dimensions."""
    return json.loads((presets.materialize(PRESET) / "config.json").read_text())


def run_enginesmith(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ENGINESMITH_THREADS": "2"}
    return subprocess.run(
        [str(ENGINESMITH), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def files_on_disk(root: Path) -> dict[str, str]:
    """sha256 of every file under ROOT except the manifest, recomputed independently."""
    out = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if rel != artifact.MANIFEST:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def test_manifest_on_disk_is_what_read_manifest_returns(engine: Path, manifest: dict) -> None:
    assert json.loads((engine / "manifest.json").read_text()) == manifest


def test_manifest_header(manifest: dict) -> None:
    defaults = BuildConfig(model=PRESET, output=Path("unused"))
    assert manifest["format_version"] == artifact.FORMAT_VERSION == 1
    assert manifest["enginesmith_version"] == enginesmith.__version__
    assert manifest["backend"] == "onnxruntime"
    assert manifest["architecture"] == "llama"
    assert manifest["source"]["model"] == PRESET
    assert manifest["source"]["kind"] == "preset"
    assert manifest["max_batch"] == defaults.max_batch
    assert manifest["max_seq_len"] == defaults.max_seq_len
    assert manifest["passes"][:2] == ["canonicalize", "fuse-attention"]
    assert "lower-flash-attention-ort" in manifest["passes"]
    assert manifest["compiler_fingerprint"] == artifact.compiler_fingerprint()
    assert manifest["build_config"]["max_batch"] == defaults.max_batch
    roles = manifest["files_by_role"]
    assert set(roles) == {"model", "weights", "tokenizer"}
    assert roles["model"] in manifest["files"]
    assert roles["weights"] in manifest["files"]
    assert any(rel.startswith(roles["tokenizer"] + "/") for rel in manifest["files"])


def test_manifest_model_dims_match_source_config(manifest: dict, hf_config: dict) -> None:
    m = manifest["model"]
    assert m["num_layers"] == hf_config["num_hidden_layers"]
    assert m["num_heads"] == hf_config["num_attention_heads"]
    assert m["num_kv_heads"] == hf_config["num_key_value_heads"]
    assert m["head_dim"] == hf_config["hidden_size"] // hf_config["num_attention_heads"]
    assert m["hidden_size"] == hf_config["hidden_size"]
    assert m["intermediate_size"] == hf_config["intermediate_size"]
    assert m["vocab_size"] == hf_config["vocab_size"]
    assert m["max_position_embeddings"] == hf_config["max_position_embeddings"]
    assert m["tie_word_embeddings"] is True
    assert m["num_kv_heads"] < m["num_heads"]  # tiny-llama is GQA
    assert hf_config["eos_token_id"] in manifest["eos_token_ids"]


def test_manifest_kv_cache(manifest: dict) -> None:
    m, kv = manifest["model"], manifest["kv_cache"]
    layers, kv_heads, head_dim = m["num_layers"], m["num_kv_heads"], m["head_dim"]
    assert kv["layout"] == "slots"
    assert kv["dtype"] == "float32"
    assert kv["num_kv_heads"] == kv_heads
    assert kv["bytes_per_token"] == 2 * layers * kv_heads * head_dim * 4 == 512
    assert kv["shape_per_layer"] == [
        manifest["max_batch"],
        kv_heads,
        manifest["max_seq_len"],
        head_dim,
    ]
    slots_tokens = manifest["max_batch"] * manifest["max_seq_len"]
    assert kv["total_bytes"] == kv["bytes_per_token"] * slots_tokens


def test_manifest_hashes_every_file_on_disk(engine: Path, manifest: dict) -> None:
    on_disk = files_on_disk(engine)
    assert (
        manifest["files"] == on_disk
    )  # same names (nothing unlisted, nothing absent), same hashes
    assert {"model.onnx", "model.onnx.data", "build_report.json"} <= set(on_disk)
    assert "tokenizer/tokenizer.json" in on_disk


def test_build_report(engine: Path, manifest: dict) -> None:
    report = json.loads((engine / "build_report.json").read_text())
    assert [p["name"] for p in report["passes"]] == manifest["passes"]
    for p in report["passes"]:
        assert isinstance(p["seconds"], float) and 0 <= p["seconds"] < 60, p
    fuse = next(p for p in report["passes"] if p["name"] == "fuse-attention")
    assert fuse["fused"] == manifest["model"]["num_layers"] and fuse["failures"] == {}
    fusion = report["fusion"]["attention -> FlashAttention"]
    assert fusion["count"] == fusion["expected"] == manifest["model"]["num_layers"]
    verify = report["verify"]
    assert verify["tokens"] > 8
    # Bounds from measurement, well under the build's own failure limit (build.VERIFY_RTOL,
    # 1e-3): tiny-llama measures max |diff| ~3e-6 and relative ~7e-7 (fp32), here x10.
    print(f"verify: {verify}")
    assert 0 <= verify["max_abs_diff"] < VERIFY_ABS_LIMIT
    assert 0 <= verify["relative_diff"] < VERIFY_RELATIVE_LIMIT
    assert 0 <= verify["decode_max_abs_diff"] < VERIFY_ABS_LIMIT  # batched decode steps
    assert verify["top1_agreement"] == 1.0
    stages = report["stage_seconds"]
    assert len(stages) == 5 and all(s >= 0 for s in stages.values())
    assert report["export"]["weight_bytes"] > 0


def test_copied_engine_generates_the_same_tokens(engine: Path, tmp_path: Path) -> None:
    from enginesmith.runtime.llm import LLM
    from enginesmith.runtime.sampling import SamplingParams

    # Nothing inside the engine may point back at where it was built.
    needle = str(engine.resolve()).encode()
    for path in engine.rglob("*"):
        if path.is_file():
            assert needle not in path.read_bytes(), f"{path} embeds the build path"

    deployed = tmp_path / "deploy" / "engine"
    shutil.copytree(engine, deployed)
    params = SamplingParams(max_tokens=8)
    original = LLM(engine).generate(list(PROMPTS), params)
    copied_llm = LLM(deployed)
    assert copied_llm.manifest == artifact.read_manifest(engine)
    copied = copied_llm.generate(list(PROMPTS), params)
    assert [o.token_ids for o in copied] == [o.token_ids for o in original]
    assert [o.text for o in copied] == [o.text for o in original]
    assert all(o.token_ids for o in original)
    assert sum(len(o.token_ids) for o in original) > len(PROMPTS)


def test_cli_inspect(engine: Path, manifest: dict) -> None:
    # Run from the engine's parent with a relative path, as after a deployment copy.
    proc = run_enginesmith("inspect", engine.name, cwd=engine.parent)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "files verified" in out
    assert "fuse-attention" in out
    assert "kv cache" in out
    assert f"{manifest['kv_cache']['bytes_per_token']} B/token" in out
    for rel, digest in manifest["files"].items():
        assert rel in out and digest[:12] in out
    assert "verify vs transformers" in out


def test_cli_inspect_json(engine: Path, manifest: dict) -> None:
    proc = run_enginesmith("inspect", str(engine), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["manifest"] == manifest
    assert data["build_report"] == json.loads((engine / "build_report.json").read_text())


def test_build_engine_if_stale_skips_a_current_engine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`build-engine --if-stale` (what scripts/demo runs) leaves an engine this compiler built
    with the same settings alone, and rebuilds one built with other settings."""
    from enginesmith.compiler.cli import build_engine_main

    out = tmp_path / "engine"
    args = ["tiny-llama", "-o", str(out), "--no-verify", "--if-stale"]
    assert build_engine_main(args) == 0
    built = (out / "manifest.json").stat().st_mtime_ns
    assert build_engine_main(args) == 0
    assert "up to date" in capsys.readouterr().out
    assert (out / "manifest.json").stat().st_mtime_ns == built
    assert build_engine_main([*args, "--max-batch", "2"]) == 0
    assert "built with other settings" in capsys.readouterr().out
    assert artifact.read_manifest(out)["max_batch"] == 2


def test_fingerprint_covers_a_features_code_only_where_the_build_uses_it() -> None:
    """A change to the KV-head recovery code makes collapsed engines stale, not every engine."""
    plain = BuildConfig(model=PRESET, output=Path("unused"))
    assert artifact.compiler_fingerprint(plain) == artifact.compiler_fingerprint()
    for changed in (
        dataclasses.replace(plain, kv_heads=1),
        dataclasses.replace(plain, kv_cache_dtype="int8"),
        dataclasses.replace(plain, draft="self:int8"),
    ):
        assert artifact.compiler_fingerprint(changed) != artifact.compiler_fingerprint(plain)
    assert artifact.compiler_fingerprint(
        dataclasses.replace(plain, kv_cache_dtype="float32")
    ) == artifact.compiler_fingerprint(plain)
