"""enginesmith: a compiler and runtime for decoder LLMs.

from enginesmith import LLM, SamplingParams
llm = LLM("path/to/engine_dir")
print(llm.generate("Hello", SamplingParams(max_tokens=16))[0].text)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "__version__"]

if TYPE_CHECKING:
    from enginesmith.runtime.llm import LLM, RequestOutput
    from enginesmith.runtime.sampling import SamplingParams


def __getattr__(name: str) -> Any:
    # Lazy: `import enginesmith` (and build-engine --help) stays fast; the runtime loads on use.
    if name in ("LLM", "RequestOutput"):
        from enginesmith.runtime import llm

        return getattr(llm, name)
    if name == "SamplingParams":
        from enginesmith.runtime.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'enginesmith' has no attribute {name!r}")
