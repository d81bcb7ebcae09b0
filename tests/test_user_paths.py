"""User paths end to end on a tiny engine: `enginesmith generate` with its flags, `--chat` on a
tokenizer without a chat template, an abandoned sync stream, a cancelled `submit()` task and an
engine-loop failure reaching every waiting caller."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from enginesmith import LLM, SamplingParams
from enginesmith.compiler import artifact
from enginesmith.runtime.engine_dir import read_manifest
from enginesmith.runtime.errors import InvalidRequestError
from tests.conftest import PROMPTS
from tests.test_bad_inputs import assert_cli_error, run_cli

CHATML_PROMPT = "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def engine(tiny_engine) -> Path:  # type: ignore[no-untyped-def]
    return tiny_engine("tiny-llama", max_batch=4, max_seq_len=128)


@pytest.fixture(scope="module")
def llm(engine: Path) -> LLM:
    return LLM(engine)


def assert_slots_free(llm: LLM) -> None:
    assert not llm.core.has_unfinished and not llm.core.live
    kv = llm.core.scheduler.kv
    assert kv.free_slots == llm.executor.max_batch and kv.tokens_in_use == 0


def test_cli_generate_runs_with_every_flag(engine: Path, llm: LLM) -> None:
    """--chat --no-stream --stop --top-k --temperature --seed --ignore-eos --max-tokens: exit 0
    and exactly the text the Python API gives for the same request."""
    sampled = dict(max_tokens=16, temperature=0.8, top_k=5, seed=3, ignore_eos=True)
    full = llm.generate(CHATML_PROMPT, SamplingParams(**sampled))[0]  # type: ignore[arg-type]
    stop = full.text[6:9]
    assert len(stop) == 3 and stop in full.text
    expected = llm.generate(CHATML_PROMPT, SamplingParams(**sampled, stop=(stop,)))[0]  # type: ignore[arg-type]
    assert expected.finish_reason == "stop" and expected.text == full.text[: full.text.index(stop)]
    proc = run_cli(
        "enginesmith",
        "generate",
        str(engine),
        "Say hello.",
        "--chat",
        "--no-stream",
        "--stop",
        stop,
        "--top-k",
        "5",
        "--temperature",
        "0.8",
        "--seed",
        "3",
        "--ignore-eos",
        "--max-tokens",
        "16",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected.text
    assert "Traceback" not in proc.stderr
    assert f"{len(expected.token_ids)} generated, finish=stop" in proc.stderr


def test_cli_streamed_output_equals_no_stream(engine: Path, llm: LLM, capsys) -> None:  # type: ignore[no-untyped-def]
    from enginesmith.runtime import cli

    args = ["generate", str(engine), PROMPTS[0], "--max-tokens", "12", "--ignore-eos"]
    assert cli.main(args) == 0
    streamed = capsys.readouterr()
    assert cli.main([*args, "--no-stream"]) == 0
    whole = capsys.readouterr()
    expected = llm.generate(PROMPTS[0], SamplingParams(max_tokens=12, ignore_eos=True))[0].text
    assert streamed.out == whole.out == expected
    assert "12 generated, finish=length" in streamed.err


@pytest.fixture(scope="module")
def engine_without_chat_template(engine: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of ENGINE whose tokenizer has no chat template (manifest hashes rewritten)."""
    copy = tmp_path_factory.mktemp("no-template") / "engine"
    shutil.copytree(engine, copy)
    manifest = read_manifest(copy)
    tokenizer = copy / manifest["files_by_role"]["tokenizer"]
    tokenizer_dir = tokenizer if tokenizer.is_dir() else tokenizer.parent
    for path in tokenizer_dir.glob("chat_template*"):
        path.unlink()
    config_path = tokenizer_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    skip = {"format_version", "files", artifact.SELF_HASH_KEY}
    artifact.write_manifest(copy, {k: v for k, v in manifest.items() if k not in skip})
    return copy


def test_chat_without_a_chat_template(engine_without_chat_template: Path) -> None:
    llm = LLM(engine_without_chat_template)
    assert not getattr(llm.tokenizer, "chat_template", None)
    with pytest.raises(InvalidRequestError, match="no chat template"):
        llm.chat([{"role": "user", "content": "hi"}])
    proc = run_cli("enginesmith", "generate", str(engine_without_chat_template), "hi", "--chat")
    line = assert_cli_error(proc, "enginesmith")
    assert "no chat template" in line and "without --chat" in line


def test_abandoned_sync_stream_frees_its_slot(llm: LLM) -> None:
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    deltas = iter(llm.stream(PROMPTS[2], params))
    assert next(deltas) and next(deltas)
    assert llm.core.has_unfinished  # the request is running
    deltas.close()  # what a `break` out of the loop and dropping the iterator does
    assert_slots_free(llm)
    # All four slots serve again, with the tokens each request gets alone.
    short = SamplingParams(max_tokens=6, ignore_eos=True)
    prompts = [*PROMPTS, PROMPTS[2] + " again"]
    together = [o.token_ids for o in llm.generate(prompts, short)]
    assert together == [llm.generate(p, short)[0].token_ids for p in prompts]


def test_cancelled_submit_task_frees_its_slot(engine: Path) -> None:
    llm = LLM(engine, spin_wait=False)
    params = SamplingParams(max_tokens=100, ignore_eos=True)
    short = SamplingParams(max_tokens=5, ignore_eos=True)

    async def cancel_one() -> tuple[bool, list[int]]:
        doomed = asyncio.create_task(llm.submit(PROMPTS[1], params))
        kept = asyncio.create_task(llm.submit(PROMPTS[0], short))
        for _ in range(500):  # until the doomed request has generated a token or two
            live = list(llm.core.live.values())
            if any(len(r.sched.output_token_ids) >= 2 for r in live if r.prompt == PROMPTS[1]):
                break
            await asyncio.sleep(0.005)
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        out = await kept
        for _ in range(200):
            if not llm.core.has_unfinished:
                break
            await asyncio.sleep(0.01)
        return doomed.cancelled(), out.token_ids

    try:
        cancelled, kept_ids = asyncio.run(cancel_one())
        assert cancelled
        assert_slots_free(llm)
        assert kept_ids == llm.generate(PROMPTS[0], short)[0].token_ids
    finally:
        llm.close()


def test_engine_loop_failure_reaches_every_waiting_caller(engine: Path) -> None:
    llm = LLM(engine, spin_wait=False)
    real_step = llm.executor.step
    failed = []

    def failing_step(*args):  # type: ignore[no-untyped-def]
        if not failed and len(llm.core.live) == len(PROMPTS):  # once every caller is waiting
            failed.append(True)
            raise RuntimeError("engine step failed")
        return real_step(*args)

    llm.executor.step = failing_step  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=30, ignore_eos=True)

    async def many() -> list[object]:
        tasks = [llm.submit(p, params) for p in PROMPTS]
        return list(await asyncio.gather(*tasks, return_exceptions=True))

    try:
        results = asyncio.run(asyncio.wait_for(many(), timeout=60))
        assert failed and len(results) == len(PROMPTS)
        for result in results:
            assert isinstance(result, RuntimeError) and str(result) == "engine step failed"
        assert_slots_free(llm)
        llm.executor.step = real_step  # type: ignore[method-assign]
        # The loop survives: the next caller is served.
        later = asyncio.run(llm.submit(PROMPTS[0], SamplingParams(max_tokens=4, ignore_eos=True)))
        assert len(later.token_ids) == 4
    finally:
        llm.close()
