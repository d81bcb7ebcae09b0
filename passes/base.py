"""Common base for enginesmith passes: an onnx_ir in-place pass that also reports what it did."""

from __future__ import annotations

from typing import Any

import onnx_ir as ir


class PassError(ValueError):
    """A pass cannot rewrite this model with these arguments; the one-line message names the
    fix. The compiler turns it into its user-facing BuildError (passes import no layer above
    them)."""


class EnginePass(ir.passes.InPlacePass):
    """An onnx_ir pass with a stable name and a `report` dict filled by `call`.

    Subclasses take their whole configuration as constructor arguments, check their inputs in
    `requires`, record counts in `self.report` and check their promise in `ensures`.
    """

    name: str = "unnamed"

    def __init__(self) -> None:
        super().__init__()
        self.report: dict[str, Any] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:  # pragma: no cover - abstract
        raise NotImplementedError
