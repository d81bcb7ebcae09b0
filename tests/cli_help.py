"""--help checks shared by the command-line tests."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import pytest


def assert_help_explains_every_flag(
    main: Callable[[list[str]], int],
    parser: argparse.ArgumentParser,
    expected: tuple[str, ...],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`main --help` exits 0 and lists EXPECTED, and every flag the parser has comes with help."""
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in expected:
        assert flag in out
    for action in parser._actions:
        if action.option_strings and "--help" not in action.option_strings:
            assert action.help, f"{action.option_strings} has no help text"
            assert any(o in out for o in action.option_strings)
