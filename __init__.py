"""enginesmith: a compiler and runtime for decoder LLMs."""

from __future__ import annotations

__version__ = "0.1.0"
