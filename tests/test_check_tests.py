"""scripts/check_tests.py: a test function without any check is named and fails the run."""

from __future__ import annotations

from pathlib import Path

from enginesmith.scripts import check_tests

EXAMPLE = """
import numpy as np
import pytest


def helper():
    pass


def test_asserts():
    assert 1 + 1 == 2


def test_raises():
    with pytest.raises(ZeroDivisionError):
        1 / 0


def test_numpy_testing():
    np.testing.assert_allclose(np.ones(2), np.ones(2))


def test_helper_named_check():
    check_model(None)


async def test_async_asserts_in_a_nested_function():
    def inner():
        assert True

    inner()


def test_only_prints():
    print(helper())


class TestGroup:
    def test_method_without_check(self):
        helper()

    def test_method_with_check(self):
        assert helper() is None


def not_a_test():
    pass
"""


def test_checker_names_each_test_without_a_check(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "test_example.py"
    bad.write_text(EXAMPLE)
    assert check_tests.main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    named = [line.split(": ")[1] for line in out.splitlines() if "asserts nothing" in line]
    assert named == ["test_only_prints", "test_method_without_check"]
    assert f"{bad}:34: test_only_prints" in out


def test_checker_passes_a_file_where_every_test_checks(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    good = tmp_path / "test_good.py"
    good.write_text("def test_one():\n    assert True\n")
    assert check_tests.main([str(good)]) == 0
    assert "every test in 1 files checks something" in capsys.readouterr().out


def test_suite_has_no_test_without_a_check() -> None:
    tests_dir = Path(__file__).parent
    assert check_tests.offenders(Path(__file__)) == []
    assert [
        line for f in check_tests.find_test_files([tests_dir]) for line in check_tests.offenders(f)
    ] == []
