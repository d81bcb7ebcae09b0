"""Model sources: a Hugging Face directory, a GGUF file, or a preset name -> a loaded model.

Loading goes through transformers' own loaders (safetensors and GGUF); enginesmith only decides
what to load and refuses what it cannot build, before any weights are read.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# transformers' GGUF dequantizer draws its own tqdm bar; tqdm reads this at import time.
os.environ.setdefault("TQDM_DISABLE", "1")

from enginesmith.compiler import presets  # noqa: E402
from enginesmith.runtime.errors import ModelSourceError, UnsupportedArchitectureError  # noqa: E402

# model_type (config.json) / general.architecture (GGUF) -> transformers class name.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",  # also SmolLM/SmolLM2
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


def supported_list() -> str:
    return ", ".join(sorted(SUPPORTED_ARCHITECTURES))


@dataclass
class LoadedModel:
    """A model ready to export: fp32 torch module in eval mode, its config and tokenizer."""

    name: str
    source_kind: str  # "hf-dir" | "gguf" | "preset"
    source_path: str
    architecture: str  # model_type, e.g. "llama"
    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers PreTrainedTokenizerFast
    load_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> Any:
        return self.model.config


def _check_architecture(model_type: str | None, where: str) -> str:
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{where}: architecture {model_type!r} is not supported; supported: "
            f"{supported_list()} (convert the model to one of these families)"
        )
    return model_type


def gguf_architecture(path: Path) -> str:
    """Read `general.architecture` from a GGUF header without loading tensors."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        field_ = reader.fields["general.architecture"]
        return bytes(field_.parts[field_.data[0]]).decode("utf-8")
    except KeyError as exc:
        raise ModelSourceError(
            f"{path}: GGUF file has no general.architecture key; re-export it with llama.cpp's "
            "convert_hf_to_gguf.py"
        ) from exc
    except Exception as exc:  # gguf raises ValueError/struct errors on corrupt files
        raise ModelSourceError(
            f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc}); "
            "pass a valid .gguf file"
        ) from exc


def _load_hf_dir(path: Path) -> LoadedModel:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelSourceError(
            f"{path}: no config.json; pass a Hugging Face model directory "
            "(config.json + *.safetensors), a .gguf file or a preset name"
        )
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelSourceError(
            f"{config_path}: unreadable config.json ({exc}); fix or replace it"
        ) from exc
    if not isinstance(config, dict):
        raise ModelSourceError(
            f"{config_path}: config.json is not a JSON object; fix or replace it"
        )
    model_type = config.get("model_type")
    arch = _check_architecture(model_type, str(path))
    if not any(path.glob("*.safetensors")):
        raise ModelSourceError(
            f"{path}: no *.safetensors weights; save the model with "
            "save_pretrained(..., safe_serialization=True)"
        )
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, SafetensorError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, SafetensorError):
            weights = ", ".join(sorted(p.name for p in path.glob("*.safetensors")))
            first_line = f"{weights}: {first_line}"
        raise ModelSourceError(
            f"{path}: cannot load the model ({first_line}); check or re-save its files"
        ) from exc
    return LoadedModel(
        name=path.name,
        source_kind="hf-dir",
        source_path=str(path),
        architecture=arch,
        model=model.eval(),
        tokenizer=tokenizer,
        load_seconds=time.perf_counter() - start,
    )


# Without these, transformers silently falls back to a default (7B) config.
_GGUF_REQUIRED_KEYS = ("block_count", "embedding_length", "attention.head_count")


def _check_gguf_metadata(path: Path, arch: str) -> None:
    import gguf

    fields = gguf.GGUFReader(str(path)).fields
    missing = [f"{arch}.{k}" for k in _GGUF_REQUIRED_KEYS if f"{arch}.{k}" not in fields]
    if missing:
        raise ModelSourceError(
            f"{path}: GGUF metadata lacks {', '.join(missing)}; re-export it with llama.cpp's "
            "convert_hf_to_gguf.py"
        )


def _load_gguf(path: Path) -> LoadedModel:
    arch = _check_architecture(gguf_architecture(path), str(path))
    _check_gguf_metadata(path, arch)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    try:
        # transformers dequantizes GGUF tensors to the requested float dtype.
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"{path}: cannot load the GGUF model ({exc})") from exc
    return LoadedModel(
        name=path.stem,
        source_kind="gguf",
        source_path=str(path),
        architecture=arch,
        model=model.eval(),
        tokenizer=tokenizer,
        load_seconds=time.perf_counter() - start,
    )


def resolve_path(model: str) -> tuple[str, Path]:
    """Map a CLI MODEL argument to (kind, path) without loading weights."""
    if model in presets.PRESETS:
        return "preset", presets.materialize(model)
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelSourceError(
            f"model {model!r} not found: pass a Hugging Face directory (config.json + "
            f"*.safetensors), a .gguf file, or a preset ({', '.join(presets.PRESETS)})"
        )
    if path.is_dir():
        return "hf-dir", path
    if path.suffix.lower() == ".gguf":
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            raise ModelSourceError(
                f"{path}: cannot read the file ({exc.strerror}); check permissions"
            ) from exc
        return "gguf", path
    raise ModelSourceError(
        f"{path}: unrecognized model file; pass a Hugging Face directory, a .gguf file or a preset"
    )


def load_model(model: str) -> LoadedModel:
    """Load MODEL (HF directory, .gguf file or preset name) as an fp32 torch model + tokenizer."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our stage lines report progress
    hf_logging.set_verbosity_error()
    kind, path = resolve_path(model)
    if path.is_dir() and not _readable(path):
        raise ModelSourceError(f"{path}: directory is not readable; check permissions")
    loaded = _load_gguf(path) if path.suffix.lower() == ".gguf" else _load_hf_dir(path)
    if kind == "preset":
        loaded.source_kind = "preset"
        loaded.name = model
    return loaded


def _readable(path: Path) -> bool:
    try:
        next(iter(path.iterdir()), None)
        return True
    except OSError:
        return False
