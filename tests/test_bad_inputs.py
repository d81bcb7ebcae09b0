"""Bad input gets a one-line error naming the problem and the fix, and nothing half-written.

Every case is checked twice: through the Python API (a typed EnginesmithError subclass whose
message names the problem and the fix) and through the CLI (non-zero exit, exactly one stderr
line `<prog>: error: ...`, no traceback). Failing builds must leave neither the output directory
nor a `.NAME.building-*` leftover behind.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from enginesmith.compiler import artifact, presets
from enginesmith.compiler.build import build
from enginesmith.compiler.config import BuildConfig
from enginesmith.compiler.sources import load_model
from enginesmith.runtime.errors import (
    EngineDirError,
    EnginesmithError,
    InvalidRequestError,
    ModelSourceError,
    UnsupportedArchitectureError,
)
from enginesmith.runtime.sampling import SamplingParams

BIN = Path(sys.executable).parent
SHORT_SEQ = 64  # max_seq_len of the engine used for prompt-length checks
LONG_PROMPT = "the quick brown fox jumps over the lazy dog " * 20


def run_cli(tool: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ENGINESMITH_THREADS": "2"}
    return subprocess.run(
        [str(BIN / tool), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def assert_cli_error(proc: subprocess.CompletedProcess[str], tool: str) -> str:
    """Non-zero exit, exactly one stderr line `TOOL: error: ...`, no traceback; return it."""
    assert proc.returncode != 0, f"{tool} exited 0; stdout={proc.stdout!r}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{proc.stderr}"
    line = lines[0]
    assert line.startswith(f"{tool}: error: "), line
    assert len(line) > len(f"{tool}: error: ") + 10, line
    return line


def assert_one_line(exc: BaseException) -> str:
    message = str(exc)
    assert message.strip(), "empty error message"
    assert "\n" not in message, f"multi-line error message: {message!r}"
    return message


def assert_mentions(message: str, needles: tuple[str, ...]) -> None:
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


@pytest.fixture(scope="module")
def short_engine(tiny_engine) -> Path:  # type: ignore[no-untyped-def]
    return tiny_engine("tiny-llama", max_seq_len=SHORT_SEQ)


@pytest.fixture(scope="module")
def short_llm(short_engine: Path):  # type: ignore[no-untyped-def]
    from enginesmith.runtime.llm import LLM

    return LLM(short_engine)


# --- bad model sources (build-engine) -------------------------------------------------------------


def _write_gguf(path: Path, arch: str) -> None:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _missing(_root: Path) -> str:
    return "/nonexistent/model"


def _bad_json(root: Path) -> str:
    model = root / "badjson"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    return str(model)


def _config_not_object(root: Path) -> str:
    model = root / "listconfig"
    model.mkdir()
    (model / "config.json").write_text("[]\n")
    return str(model)


def _corrupt_safetensors(root: Path) -> str:
    model = root / "corruptweights"
    model.mkdir()
    preset = presets.materialize("tiny-llama")
    shutil.copy(preset / "config.json", model / "config.json")
    (model / "model.safetensors").write_bytes(random.Random(1).randbytes(2048))
    return str(model)


def _random_gguf(root: Path) -> str:
    path = root / "random.gguf"
    data = random.Random(0).randbytes(4096)
    assert not data.startswith(b"GGUF")
    path.write_bytes(data)
    return str(path)


def _gpt2(root: Path) -> str:
    model = root / "gpt2"
    model.mkdir()
    config = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 1024}
    (model / "config.json").write_text(json.dumps(config))
    return str(model)


def _mamba_gguf(root: Path) -> str:
    path = root / "mamba.gguf"
    _write_gguf(path, "mamba")
    return str(path)


SUPPORTED = ("llama", "mistral", "qwen2")

# id -> (make the model source, expected exception, substrings naming the problem and the fix)
SOURCE_CASES = [
    pytest.param(
        _missing,
        ModelSourceError,
        ("/nonexistent/model", "not found", "pass a Hugging Face directory", ".gguf", "preset"),
        id="missing-path",
    ),
    pytest.param(
        _bad_json,
        ModelSourceError,
        ("config.json", "unreadable", "fix or replace it"),
        id="config-not-json",
    ),
    pytest.param(
        _random_gguf,
        ModelSourceError,
        ("random.gguf", "not a readable GGUF file", "pass a valid .gguf file"),
        id="gguf-random-bytes",
    ),
    pytest.param(
        _gpt2,
        UnsupportedArchitectureError,
        ("'gpt2'", "not supported", *SUPPORTED),
        id="unsupported-architecture",
    ),
    pytest.param(
        _mamba_gguf,
        UnsupportedArchitectureError,
        ("mamba.gguf", "'mamba'", "not supported", *SUPPORTED),
        id="gguf-unknown-architecture",
    ),
    pytest.param(
        _config_not_object,
        ModelSourceError,
        ("config.json",),
        id="config-json-not-an-object",
    ),
    pytest.param(
        _corrupt_safetensors,
        ModelSourceError,
        ("model.safetensors",),
        id="corrupt-safetensors",
    ),
]


def _assert_nothing_written(parent: Path, output: Path) -> None:
    assert not output.exists(), f"{output} was created by a failed build"
    leftovers = sorted(p.name for p in parent.iterdir())
    assert leftovers == [], f"leftovers in {parent}: {leftovers}"


@pytest.mark.parametrize(("make", "error", "needles"), SOURCE_CASES)
def test_bad_model_source_python(
    tmp_path: Path,
    make: Callable[[Path], str],
    error: type[EnginesmithError],
    needles: tuple[str, ...],
) -> None:
    model = make(tmp_path)
    parent = tmp_path / "engines"
    parent.mkdir()
    output = parent / "out"
    with pytest.raises(error) as info:
        build(BuildConfig(model=model, output=output), log=lambda _msg: None)
    assert_mentions(assert_one_line(info.value), needles)
    _assert_nothing_written(parent, output)


@pytest.mark.parametrize(("make", "error", "needles"), SOURCE_CASES)
def test_bad_model_source_cli(
    tmp_path: Path,
    make: Callable[[Path], str],
    error: type[EnginesmithError],
    needles: tuple[str, ...],
) -> None:
    model = make(tmp_path)
    parent = tmp_path / "engines"
    parent.mkdir()
    output = parent / "out"
    line = assert_cli_error(run_cli("build-engine", model, "-o", str(output)), "build-engine")
    assert_mentions(line, needles)
    _assert_nothing_written(parent, output)


# --- nothing half-written ---------------------------------------------------------------------------


def test_failure_while_writing_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Path] = []

    def broken_write(model: object, tokenizer: object, out_dir: Path) -> dict[str, str]:
        seen.append(Path(out_dir))
        (out_dir / "model.onnx").write_bytes(b"half a model")
        (out_dir / "tokenizer").mkdir()
        raise RuntimeError("disk full while writing")

    monkeypatch.setattr(
        "enginesmith.compiler.backends.onnxruntime.write_engine_files", broken_write
    )
    parent = tmp_path / "engines"
    parent.mkdir()
    output = parent / "tl"
    with pytest.raises(RuntimeError, match="disk full"):
        build_config = BuildConfig(model="tiny-llama", output=output, max_seq_len=SHORT_SEQ)
        build(build_config, log=lambda _msg: None)
    assert len(seen) == 1, "write_engine_files was not reached"
    assert seen[0].parent == parent.resolve()
    assert seen[0].name.startswith(".tl.building-")
    assert not seen[0].exists()
    _assert_nothing_written(parent, output)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _existing_output(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    output = tmp_path / "engines" / "out"
    (output / "sub").mkdir(parents=True)
    (output / "notes.txt").write_text("my own files\n")
    (output / "sub" / "data.bin").write_bytes(bytes(range(256)))
    return output, _snapshot(output)


def test_existing_output_without_force_python(tmp_path: Path) -> None:
    output, before = _existing_output(tmp_path)
    with pytest.raises(EngineDirError) as info:
        build(BuildConfig(model="tiny-llama", output=output), log=lambda _msg: None)
    assert_mentions(assert_one_line(info.value), ("already exists", "--force", "out"))
    assert _snapshot(output) == before
    assert sorted(p.name for p in output.parent.iterdir()) == ["out"]


def test_existing_output_without_force_cli(tmp_path: Path) -> None:
    output, before = _existing_output(tmp_path)
    line = assert_cli_error(
        run_cli("build-engine", "tiny-llama", "-o", str(output)), "build-engine"
    )
    assert_mentions(line, ("already exists", "--force"))
    assert _snapshot(output) == before
    assert sorted(p.name for p in output.parent.iterdir()) == ["out"]


def test_existing_output_with_force_is_replaced(tmp_path: Path) -> None:
    output, _ = _existing_output(tmp_path)
    written = build(
        BuildConfig(model="tiny-llama", output=output, max_seq_len=SHORT_SEQ, force=True),
        log=lambda _msg: None,
    )
    manifest = artifact.read_manifest(output)  # verifies every hash
    assert manifest == written
    assert not (output / "notes.txt").exists()
    assert not (output / "sub").exists()
    assert (output / "model.onnx").is_file()
    assert sorted(p.name for p in output.parent.iterdir()) == ["out"]


def test_atomic_dir_failure_during_forced_overwrite_keeps_old(tmp_path: Path) -> None:
    output, before = _existing_output(tmp_path)
    with pytest.raises(RuntimeError, match="boom"), artifact.atomic_engine_dir(output, True) as tmp:
        (tmp / "model.onnx").write_bytes(b"partial")
        raise RuntimeError("boom")
    assert _snapshot(output) == before
    assert sorted(p.name for p in output.parent.iterdir()) == ["out"]


def test_atomic_dir_forced_over_a_file_leaves_no_leftover(tmp_path: Path) -> None:
    parent = tmp_path / "engines"
    parent.mkdir()
    output = parent / "out"
    output.write_text("a file, not an engine\n")
    with artifact.atomic_engine_dir(output, True) as tmp:
        (tmp / "model.onnx").write_bytes(b"x")
    assert (output / "model.onnx").read_bytes() == b"x"
    assert sorted(p.name for p in parent.iterdir()) == ["out"]


# --- bad engine directories ---------------------------------------------------------------------


def _flip_weight_byte(root: Path) -> None:
    path = root / "model.onnx.data"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _append_tokenizer(root: Path) -> None:
    with (root / "tokenizer" / "tokenizer.json").open("a") as f:
        f.write(" ")


def _delete_file(root: Path) -> None:
    (root / "tokenizer" / "tokenizer_config.json").unlink()


def _stray_file(root: Path) -> None:
    (root / "stray.bin").write_bytes(b"\0" * 16)


def _edit_manifest(root: Path, edit: Callable[[dict], None]) -> None:
    path = root / artifact.MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=2))


def _newer_format(root: Path) -> None:
    _edit_manifest(root, lambda m: m.update(format_version=999))


def _edited_manifest_dims(root: Path) -> None:
    _edit_manifest(root, lambda m: m["model"].update(num_kv_heads=4))


def _manifest_not_object(root: Path) -> None:
    (root / artifact.MANIFEST).write_text("[1]\n")


def _no_dir(root: Path) -> None:
    shutil.rmtree(root)


ENGINE_CASES = [
    pytest.param(
        _flip_weight_byte, ("model.onnx.data", "modified", "rebuild"), id="weights-byte-modified"
    ),
    pytest.param(
        _append_tokenizer,
        ("tokenizer/tokenizer.json", "modified", "rebuild"),
        id="tokenizer-modified",
    ),
    pytest.param(
        _delete_file,
        ("tokenizer/tokenizer_config.json", "missing", "copy the whole engine directory"),
        id="file-deleted",
    ),
    pytest.param(_stray_file, ("stray.bin", "unexpected", "remove it"), id="unlisted-file"),
    pytest.param(_newer_format, ("999", "newer", "upgrade"), id="newer-format-version"),
    pytest.param(_no_dir, ("no such engine directory", "build-engine"), id="no-directory"),
    pytest.param(
        _edited_manifest_dims,
        ("manifest", "rebuild"),
        id="manifest-edited",
    ),
    pytest.param(
        _manifest_not_object,
        ("manifest", "rebuild"),
        id="manifest-not-an-object",
    ),
]


def _broken_copy(engine: Path, tmp_path: Path, damage: Callable[[Path], None]) -> Path:
    root = tmp_path / "engine"
    shutil.copytree(engine, root)
    damage(root)
    return root


@pytest.mark.parametrize(("damage", "needles"), ENGINE_CASES)
def test_bad_engine_dir_python(
    short_engine: Path,
    tmp_path: Path,
    damage: Callable[[Path], None],
    needles: tuple[str, ...],
) -> None:
    from enginesmith.runtime.llm import LLM

    root = _broken_copy(short_engine, tmp_path, damage)
    with pytest.raises(EngineDirError) as info:
        LLM(root)
    assert_mentions(assert_one_line(info.value), needles)


@pytest.mark.parametrize("command", ["inspect", "generate"])
@pytest.mark.parametrize(("damage", "needles"), ENGINE_CASES)
def test_bad_engine_dir_cli(
    short_engine: Path,
    tmp_path: Path,
    damage: Callable[[Path], None],
    needles: tuple[str, ...],
    command: str,
) -> None:
    root = _broken_copy(short_engine, tmp_path, damage)
    args = [command, str(root)] + (["hi", "--max-tokens", "2"] if command == "generate" else [])
    proc = run_cli("enginesmith", *args)
    line = assert_cli_error(proc, "enginesmith")
    assert_mentions(line, needles)
    assert proc.stdout == ""


def test_damaged_copy_leaves_original_intact(short_engine: Path) -> None:
    """The damage above was done to copies: the fixture engine still verifies."""
    assert artifact.read_manifest(short_engine)["max_seq_len"] == SHORT_SEQ


# --- prompt longer than the engine's max sequence length ------------------------------------------


def test_prompt_too_long_python(short_llm) -> None:  # type: ignore[no-untyped-def]
    n = len(short_llm.tokenizer(LONG_PROMPT).input_ids)
    assert n > SHORT_SEQ
    needles = (f"{n} tokens", f"max sequence length is {SHORT_SEQ}", "--max-seq-len")
    with pytest.raises(InvalidRequestError) as info:
        short_llm.generate(LONG_PROMPT, SamplingParams(max_tokens=4))
    assert_mentions(assert_one_line(info.value), needles)
    with pytest.raises(InvalidRequestError, match="--max-seq-len"):
        short_llm.stream(LONG_PROMPT, SamplingParams(max_tokens=4))
    with pytest.raises(InvalidRequestError, match="--max-seq-len"):
        short_llm.chat([{"role": "user", "content": LONG_PROMPT}], SamplingParams(max_tokens=4))
    # One bad prompt in a batch rejects the batch before anything runs.
    with pytest.raises(InvalidRequestError, match="--max-seq-len"):
        short_llm.generate(["hello", LONG_PROMPT], SamplingParams(max_tokens=4))


def _prompt_of(llm, tokens: int) -> str:  # type: ignore[no-untyped-def]
    prompt = " the" * tokens
    assert len(llm.tokenizer(prompt).input_ids) == tokens
    return prompt


def test_prompt_length_boundary(short_llm) -> None:  # type: ignore[no-untyped-def]
    # max_seq_len counts prompt + generated tokens, so a full-length prompt leaves no room.
    with pytest.raises(InvalidRequestError, match="--max-seq-len"):
        short_llm.generate(_prompt_of(short_llm, SHORT_SEQ), SamplingParams(max_tokens=1))
    (out,) = short_llm.generate(
        _prompt_of(short_llm, SHORT_SEQ - 1), SamplingParams(max_tokens=8, ignore_eos=True)
    )
    assert len(out.token_ids) == 1
    assert out.finish_reason == "length"
    (out,) = short_llm.generate(
        _prompt_of(short_llm, 10), SamplingParams(max_tokens=1000, ignore_eos=True)
    )
    assert len(out.prompt_token_ids) + len(out.token_ids) == SHORT_SEQ
    assert out.finish_reason == "length"


def test_prompt_too_long_cli(short_engine: Path) -> None:
    proc = run_cli("enginesmith", "generate", str(short_engine), LONG_PROMPT, "--max-tokens", "4")
    line = assert_cli_error(proc, "enginesmith")
    assert_mentions(line, (f"max sequence length is {SHORT_SEQ}", "--max-seq-len"))
    assert proc.stdout == ""


# --- bad sampling parameters ------------------------------------------------------------------------

# (SamplingParams kwargs, CLI flags, substrings naming the problem and the fix)
SAMPLING_CASES = [
    pytest.param(
        {"max_tokens": 0},
        ["--max-tokens", "0"],
        ("max_tokens", ">= 1", "got 0", "at least one token"),
        id="max_tokens=0",
    ),
    pytest.param(
        {"max_tokens": -3},
        ["--max-tokens", "-3"],
        ("max_tokens", ">= 1", "got -3", "at least one token"),
        id="max_tokens=-3",
    ),
    pytest.param(
        {"top_p": 0.0},
        ["--top-p", "0.0"],
        ("top_p", "(0, 1]", "got 0.0", "use 1.0 to disable"),
        id="top_p=0",
    ),
    pytest.param(
        {"top_p": -0.1},
        ["--top-p", "-0.1"],
        ("top_p", "(0, 1]", "got -0.1", "use 1.0 to disable"),
        id="top_p=-0.1",
    ),
    pytest.param(
        {"top_p": 1.5},
        ["--top-p", "1.5"],
        ("top_p", "(0, 1]", "got 1.5", "use 1.0 to disable"),
        id="top_p=1.5",
    ),
    pytest.param(
        {"temperature": -0.5},
        ["--temperature", "-0.5"],
        ("temperature", ">= 0", "got -0.5", "use 0 for greedy"),
        id="temperature=-0.5",
    ),
]


@pytest.mark.parametrize(("kwargs", "flags", "needles"), SAMPLING_CASES)
def test_bad_sampling_params_python(
    kwargs: dict[str, object], flags: list[str], needles: tuple[str, ...]
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert_mentions(assert_one_line(info.value), needles)


@pytest.mark.parametrize(("kwargs", "flags", "needles"), SAMPLING_CASES)
def test_bad_sampling_params_cli(
    short_engine: Path, kwargs: dict[str, object], flags: list[str], needles: tuple[str, ...]
) -> None:
    proc = run_cli("enginesmith", "generate", str(short_engine), "hi", *flags)
    assert_mentions(assert_cli_error(proc, "enginesmith"), needles)
    assert proc.stdout == ""


def test_negative_seed_python(short_llm) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidRequestError, match="seed"):
        short_llm.generate("hi", SamplingParams(max_tokens=2, temperature=1.0, seed=-1))


def test_negative_seed_cli(short_engine: Path) -> None:
    proc = run_cli(
        "enginesmith", "generate", str(short_engine), "hi", "--temperature", "1", "--seed", "-1"
    )
    assert "seed" in assert_cli_error(proc, "enginesmith")


def test_gguf_without_shape_metadata_is_refused_before_loading(tmp_path: Path) -> None:
    """A llama GGUF without its shape keys would make transformers fall back to a 7B default
    config (and run out of memory): it must be refused before any tensor is read."""
    import gguf
    import numpy as np

    path = tmp_path / "bare-llama.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelSourceError, match=r"llama\.block_count.*convert_hf_to_gguf"):
        load_model(str(path))
