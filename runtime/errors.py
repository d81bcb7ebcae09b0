"""Typed user errors. Each message is one line that names the problem and the fix."""

from __future__ import annotations


class EnginesmithError(Exception):
    """Base class for errors caused by user input (shown without a traceback by the CLIs)."""


class ModelSourceError(EnginesmithError):
    """The model path, preset name or file cannot be read."""


class UnsupportedArchitectureError(EnginesmithError):
    """The model's architecture is not one enginesmith can build."""


class EngineDirError(EnginesmithError):
    """An engine directory is missing, modified, of an unknown format, or would be overwritten."""


class InvalidRequestError(EnginesmithError):
    """A generation request (prompt or sampling parameters) cannot be served."""


class BackendUnavailableError(EnginesmithError):
    """The requested backend or its runtime library is not installed or usable here."""


class BuildError(EnginesmithError):
    """The build failed for a reason the user can act on."""
