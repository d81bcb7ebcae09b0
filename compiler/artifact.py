"""Engine directories, the writing side: atomic writing, the manifest with sha256 of every file,
staleness against the compiler that would build it now. Reading is runtime/engine_dir.py."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from enginesmith.runtime.engine_dir import (
    FORMAT_VERSION,
    MANIFEST,
    SELF_HASH_KEY,
    hash_tree,
    manifest_digest,
    read_manifest,
)
from enginesmith.runtime.errors import EngineDirError

# What an engine's files depend on: always the graph (export, pipeline, passes, plugins), the
# weights' loading and the backends; the rest only where the build used it (a change to the
# KV-head recovery must not invalidate every cached engine, only collapsed ones).
_COMPILER_SOURCES = (
    "compiler/backends",
    "compiler/build.py",
    "compiler/export.py",
    "compiler/pipeline.py",
    "compiler/sources.py",
    "passes",
    "plugins",
)
# (whether a BuildConfig uses the feature, the sources that then shape its files)
_FEATURE_SOURCES: tuple[tuple[Callable[[Any], bool], tuple[str, ...]], ...] = (
    (
        lambda c: c.kv_heads is not None,
        ("compiler/kv_recovery.py", "compiler/kv_calibration.py"),
    ),
    (lambda c: c.kv_cache_dtype != "float32", ("compiler/kv_cache_calibration.py",)),
    (lambda c: c.draft is not None, ("compiler/draft.py",)),
)


def compiler_fingerprint(config: Any = None) -> str:
    """sha256 over the compiler sources that produce an engine's files (_COMPILER_SOURCES, plus
    the _FEATURE_SOURCES of the features CONFIG, a BuildConfig, uses): recorded in every
    manifest so that cached engines (benchmarks) can tell they are stale."""
    root = Path(__file__).resolve().parent.parent
    entries = list(_COMPILER_SOURCES)
    for uses, paths in _FEATURE_SOURCES:
        if config is not None and uses(config):
            entries.extend(paths)
    digest = hashlib.sha256()
    for entry in entries:
        path = root / entry
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for f in files:
            digest.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:16]


def stale_reason(engine_dir: Path, config: Any) -> str | None:
    """Why the engine at ENGINE_DIR is not what CONFIG (a BuildConfig) would build now, or None
    when it is: missing, built by other compiler code, or built with other settings."""
    if not (engine_dir / "manifest.json").is_file():
        return "no engine there yet"
    manifest = read_manifest(engine_dir, verify_hashes=False)
    if manifest.get("compiler_fingerprint") != compiler_fingerprint(config):
        return "it was built by other compiler code"
    if manifest.get("build_config") != config.fingerprint_fields():
        return "it was built with other settings"
    return None


@contextmanager
def atomic_engine_dir(output: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary directory beside OUTPUT; move it to OUTPUT only if the body succeeds.

    A failed or interrupted build leaves nothing at OUTPUT (the temporary directory is removed,
    and its dot-name keeps a killed build's leftovers out of the way).
    """
    output = output.expanduser().resolve()
    if output.exists() and not force:
        raise EngineDirError(
            f"{output} already exists: pass --force to overwrite it, or choose another -o"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.building-", dir=output.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; an engine directory is meant to be shared
    try:
        yield tmp
        if output.exists():
            old = output.with_name(f".{output.name}.old-{os.getpid()}")
            output.rename(old)
            tmp.rename(output)
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        else:
            tmp.rename(output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_manifest(engine_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Add format_version, file hashes and the manifest's own hash; write it; return it."""
    full = {"format_version": FORMAT_VERSION, **manifest, "files": hash_tree(engine_dir)}
    full[SELF_HASH_KEY] = manifest_digest(full)
    (engine_dir / MANIFEST).write_text(json.dumps(full, indent=2) + "\n")
    return full
