#!/usr/bin/env python3
"""Build MODEL into an engine and check it against Hugging Face transformers on the same weights:
greedy tokens (identical) and last-position logits (relative difference), for a few prompts.

    .venv/bin/python scripts/verify_model.py MODEL [--tokens 32] [--engine DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from enginesmith import LLM, SamplingParams
from enginesmith.compiler.build import build
from enginesmith.compiler.config import BuildConfig
from enginesmith.compiler.sources import load_model

PROMPTS = ["def fibonacci(n):", "The quick brown fox jumps over the lazy dog.", "In the beginning"]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="HF directory, .gguf file or preset")
    parser.add_argument(
        "--tokens", type=int, default=32, help="greedy tokens to compare (default: 32)"
    )
    parser.add_argument(
        "--engine", type=Path, help="engine directory to build into (default: a temp dir)"
    )
    args = parser.parse_args()
    engine = args.engine or Path(tempfile.mkdtemp(prefix="enginesmith-verify-")) / "engine"
    build(BuildConfig(model=args.model, output=engine, force=True))
    llm, ref = LLM(engine), load_model(args.model)
    ok = True
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=args.tokens, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = ref.tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = ref.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=args.tokens,
                min_new_tokens=args.tokens,
            )
            logits = ref.model(ids).logits[0, -1].numpy()
        expected = gen[0, ids.shape[1] :].tolist()
        n = ids.shape[1]
        ours = llm.executor.step(
            0,
            ids.numpy(),
            np.arange(n)[None],
            np.array([n - 1], np.int32),
            np.array([n], np.int32),
            np.array([n - 1]),
        )[0]
        rel = float(np.abs(ours - logits).max() / np.abs(logits).max())
        same = out.token_ids == expected
        ok &= same and rel < 1e-4
        print(
            f"{'MATCH' if same else 'DIFFER'}  {prompt!r}: {args.tokens} greedy tokens; "
            f"last-position logits relative diff {rel:.2e}"
        )
    print("verdict:", "identical to transformers" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
