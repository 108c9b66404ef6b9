"""Both front doors print a user's mistake as one message and let a bug keep its traceback."""

from __future__ import annotations

import pytest

from crackclf import cli


def test_cli_reports_bad_input_in_one_line(capsys):
    assert cli.main(["serve", "--model", "m.ckpt", "--port", "70000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("crackclf serve: error: --port 70000 must be between 0 and 65535")
    assert "Traceback" not in err


def test_cli_lets_a_bug_show_its_traceback(monkeypatch):
    parser = cli.build_parser()

    def buggy(args):
        return [1, 2][5]  # an IndexError is a defect in crackclf, not bad input

    original = parser.parse_args

    def parse_args(argv=None):
        args = original(argv)
        args.func = buggy
        return args

    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_args", parse_args)
    with pytest.raises(IndexError):
        cli.main(["serve", "--model", "m.ckpt"])


def test_short_error_quotes_the_type_and_the_first_line_only():
    from crackclf.errors import short_error

    assert short_error(ValueError("bad header\n  at byte 12\n  ...")) == "ValueError: bad header"
    assert short_error(OSError("x" * 500), limit=10) == "OSError: " + "x" * 10
    assert short_error(KeyError()) == "KeyError"  # an empty message would have raised IndexError before
