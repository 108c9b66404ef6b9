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


def test_predict_evaluate_and_serve_share_one_declaration_of_the_model_options():
    """The same options, help and defaults in the three commands (serve once had its own, with other defaults)."""
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    model_options = ("--model", "--threshold", "--tta", "--backend", "--device")

    def declared(name):
        actions = {o: a for a in commands[name]._actions for o in a.option_strings}
        return {o: (actions[o].default, actions[o].help, actions[o].choices) for o in model_options}

    assert declared("predict") == declared("evaluate") == declared("serve")
    assert declared("serve")["--backend"][0] == "auto" and declared("serve")["--device"][0] == "auto"
    parsed = [parser.parse_args(argv) for argv in (["predict", "--model", "m", "x.jpg"],
                                                   ["evaluate", "--model", "m", "--data", "d"],
                                                   ["serve", "--model", "m"])]
    assert len({(a.threshold, a.tta, a.backend, a.device) for a in parsed}) == 1
