"""Engine directories, the writing side: atomic writing, the manifest with sha256 of every file,
staleness against the compiler that would build it now. Reading is runtime/engine_dir.py."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
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

# The code that decides what an engine's graph is: an engine built by other code is stale.
# Everything whose change can change an engine's files: the graph (export, pipeline, passes,
# plugins), its weights (sources, KV-head recovery, KV-cache scales), the backends and the draft.
_COMPILER_SOURCES = (
    "compiler/build.py",
    "compiler/backends",
    "compiler/draft.py",
    "compiler/export.py",
    "compiler/kv_cache_calibration.py",
    "compiler/kv_calibration.py",
    "compiler/kv_recovery.py",
    "compiler/pipeline.py",
    "compiler/sources.py",
    "passes",
    "plugins",
)


def compiler_fingerprint() -> str:
    """sha256 over the compiler sources that produce an engine's files (_COMPILER_SOURCES):
    recorded in every manifest so that cached engines (benchmarks) can tell they are stale."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for entry in _COMPILER_SOURCES:
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
    if manifest.get("compiler_fingerprint") != compiler_fingerprint():
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
