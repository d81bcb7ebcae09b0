"""Engine directories: atomic writing, manifest with sha256 of every file, verified reading.

Loading never executes code from the directory: JSON, ONNX and tokenizer files only.
"""

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

from enginesmith.compiler.errors import EngineDirError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


# The code that decides what an engine's graph is: an engine built by other code is stale.
_COMPILER_SOURCES = ("compiler/export.py", "compiler/pipeline.py", "passes", "plugins")


def compiler_fingerprint() -> str:
    """sha256 over the compiler's graph-producing sources (export, pipeline, passes, plugins):
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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ROOT except the manifest, keyed by POSIX relative path."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in files}


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


SELF_HASH_KEY = "manifest_sha256"


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own hash: covers every field."""
    body = {k: v for k, v in manifest.items() if k != SELF_HASH_KEY}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_manifest(engine_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Add format_version, file hashes and the manifest's own hash; write it; return it."""
    full = {"format_version": FORMAT_VERSION, **manifest, "files": hash_tree(engine_dir)}
    full[SELF_HASH_KEY] = manifest_digest(full)
    (engine_dir / MANIFEST).write_text(json.dumps(full, indent=2) + "\n")
    return full


def read_manifest(engine_dir: str | Path, verify_hashes: bool = True) -> dict[str, Any]:
    """Read and check ENGINE_DIR's manifest; raise EngineDirError naming the fix."""
    root = Path(engine_dir).expanduser()
    if not root.is_dir():
        raise EngineDirError(
            f"{root}: no such engine directory; build one with build-engine MODEL -o {root}"
        )
    path = root / MANIFEST
    if not path.is_file():
        raise EngineDirError(
            f"{root}: not an engine directory (no {MANIFEST}); build one with build-engine"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EngineDirError(
            f"{path}: unreadable manifest ({exc}); rebuild the engine with build-engine --force"
        ) from exc
    if not isinstance(manifest, dict):
        raise EngineDirError(
            f"{path}: manifest is not a JSON object; rebuild the engine with build-engine --force"
        )
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise EngineDirError(
            f"{path}: manifest has no format_version; rebuild the engine with build-engine --force"
        )
    if version > FORMAT_VERSION:
        raise EngineDirError(
            f"{root}: engine format_version {version} is newer than this enginesmith supports "
            f"({FORMAT_VERSION}); upgrade enginesmith or rebuild the engine with this version"
        )
    if verify_hashes:
        if SELF_HASH_KEY not in manifest:
            raise EngineDirError(
                f"{root}: {MANIFEST} has no {SELF_HASH_KEY} (built by an older enginesmith); "
                "rebuild the engine with build-engine --force"
            )
        if manifest[SELF_HASH_KEY] != manifest_digest(manifest):
            raise EngineDirError(
                f"{root}: {MANIFEST} was modified (its sha256 does not match); rebuild the engine "
                "with build-engine --force"
            )
        expected: dict[str, str] = manifest.get("files", {})
        for rel, digest in expected.items():
            file = root / rel
            if not file.is_file():
                raise EngineDirError(
                    f"{root}: file {rel} is missing; copy the whole engine directory or rebuild it"
                )
            if sha256_file(file) != digest:
                raise EngineDirError(
                    f"{root}: file {rel} was modified (sha256 mismatch); rebuild the engine with "
                    "build-engine --force"
                )
        extra = set(hash_tree(root)) - set(expected)
        unexpected = sorted(e for e in extra if not e.startswith("."))
        if unexpected:
            raise EngineDirError(
                f"{root}: unexpected file {unexpected[0]} not listed in the manifest; remove it or rebuild"
            )
    return manifest
