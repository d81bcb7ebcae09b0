"""Fail when a test function asserts nothing: a test that cannot fail proves nothing.

    python scripts/check_tests.py [PATH ...]   (default: tests)

Reads every `test_*.py` under each PATH (or the files named) without importing them, and checks
that every `test_*` function (module level or in a `Test*` class) contains at least one check:
an `assert` statement, `pytest.raises` / `pytest.warns` / `pytest.fail`, an
`np.testing.assert_*` / `numpy.testing.assert_*` call, or a call of a helper whose name starts
with `assert_` or `check_` (the suite's convention for helpers that assert). Exits 1 naming each
offending test as `path:line: name`, 0 when every test checks something.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

CHECK_CALLS = {"raises", "warns", "fail", "deprecated_call"}  # pytest.<name>(...)
CHECK_PREFIXES = ("assert", "check_")  # assert_*, assertEqual, check_*


def _call_name(func: ast.expr) -> str:
    """The last dotted part of a called expression (`np.testing.assert_allclose` ->
    `assert_allclose`), or '' for anything more dynamic."""
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return ""


def _is_check(node: ast.AST) -> bool:
    if isinstance(node, ast.Assert):
        return True
    if isinstance(node, ast.Call):
        name = _call_name(node.func)
        if name.startswith(CHECK_PREFIXES):
            return True
        owner = node.func.value if isinstance(node.func, ast.Attribute) else None
        if isinstance(owner, ast.Name) and owner.id == "pytest" and name in CHECK_CALLS:
            return True
    return False


def checks_something(func: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Whether FUNC's body (nested functions included) contains a check."""
    return any(_is_check(node) for node in ast.walk(func))


def collect_tests(tree: ast.Module) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Module-level `test_*` functions and `test_*` methods of `Test*` classes."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith(
            "test"
        ):
            yield node
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and (
                    item.name.startswith("test")
                ):
                    yield item


def offenders(path: Path) -> list[str]:
    """`path:line: name` for every test in PATH that checks nothing."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [
        f"{path}:{func.lineno}: {func.name}"
        for func in collect_tests(tree)
        if not checks_something(func)
    ]


def find_test_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        files.extend(sorted(path.rglob("test_*.py")) if path.is_dir() else [path])
    return files


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    files = find_test_files([Path(a) for a in args or ["tests"]])
    bad = [line for f in files for line in offenders(f)]
    for line in bad:
        print(f"{line}: asserts nothing (add an assert, pytest.raises or an assert_*/check_* call)")
    if bad:
        print(f"check_tests: {len(bad)} test(s) without a check in {len(files)} files")
        return 1
    print(f"check_tests: every test in {len(files)} files checks something")
    return 0


if __name__ == "__main__":
    sys.exit(main())
