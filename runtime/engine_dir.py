"""Engine directories, the reading side: the manifest, checked against the sha256 of every file.

Loading never executes code from the directory: JSON, ONNX and tokenizer files only. The
compiler writes directories (compiler/artifact.py) and imports these names from here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from enginesmith.runtime.errors import EngineDirError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SELF_HASH_KEY = "manifest_sha256"


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own hash: covers every field."""
    body = {k: v for k, v in manifest.items() if k != SELF_HASH_KEY}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


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
