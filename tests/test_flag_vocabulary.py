"""One vocabulary of flags: every sub-command's parser is walked, and a flag with two readings fails.

Two readings are: a flag missing from nonn.cli.vocabulary (which states each flag's one meaning),
a switch in one command and a value in another, values of different kinds (a number in one, a
path in another, a choice among other words in a third), or a metavar of a command's own that differs from the vocabulary's. Old
spellings stay as hidden aliases for one release and warn.
"""

from __future__ import annotations

import argparse
import logging
from collections import defaultdict

import pytest

from nonn.cli import build_parser, main
from nonn.cli.vocabulary import VOCABULARY, apply_vocabulary, format_vocabulary, visible_options


def value_kind(action: argparse.Action) -> str:
    """'switch', or the Python type of the value the flag takes (int, float or str) and its arity."""
    if action.nargs == 0:
        return "switch"
    try:
        converted = type(action.type("1")).__name__ if callable(action.type) else "str"
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        converted = getattr(action.type, "__name__", "parsed")  # a structured value, e.g. MEAN,..:STD,..
    choices = "" if not action.choices else f" in {sorted(action.choices)}"
    return f"{converted} value{choices}" + ("" if action.nargs is None else f" (nargs {action.nargs})")


def test_every_flag_has_one_meaning_in_every_command(capsys):
    uses: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for command, action, option in visible_options(build_parser()):
        uses[option].append((command or "nonn", value_kind(action)))

    missing = sorted(f"{option} ({', '.join(c for c, _ in where)})" for option, where in uses.items() if option not in VOCABULARY)
    assert not missing, f"flags not in nonn.cli.vocabulary.VOCABULARY: {missing}"
    mixed = {option: sorted(set(where)) for option, where in uses.items() if len({kind for _, kind in where}) > 1}
    assert not mixed, f"flags taken in two ways: {mixed}"
    unused = sorted(set(VOCABULARY) - set(uses))
    assert not unused, f"vocabulary entries no command uses: {unused}"
    with capsys.disabled():
        print("\n" + format_vocabulary())


def test_a_command_cannot_give_a_flag_another_metavar():
    parser = argparse.ArgumentParser(prog="nonn")
    sub = parser.add_subparsers().add_parser("odd")
    sub.add_argument("--students", metavar="K", type=int)
    with pytest.raises(ValueError, match=r"nonn odd --students K: the flag vocabulary says --students FILE"):
        apply_vocabulary(parser)


def test_help_shows_the_vocabulary_metavars():
    parser = build_parser()
    choices = {a.dest: a for a in parser._actions if isinstance(a, argparse._SubParsersAction)}["command"].choices
    assert "-K K, --num-students K" in choices["partition"].format_help()
    assert "--fleet PROFILE[:COUNT],..." in choices["simulate"].format_help()
    assert "--devices HOST:PORT,..." in choices["infer"].format_help()
    assert "--students FILE" in choices["evaluate"].format_help()
    assert "--json [FILE]" in choices["infer"].format_help()
    # Old spellings are accepted but not advertised.
    assert "--tls-ca" not in choices["infer"].format_help() and "--no-overwrite" not in choices["export"].format_help()


OLD_AND_NEW = [
    # (old argv, new argv, destination that must agree)
    (["partition", "--fan", "f.npy", "--students", "4", "--out", "p.json"], ["partition", "--fan", "f.npy", "-K", "4", "--out", "p.json"], "num_students"),
    (["train-students", "--partition", "p.json", "--students", "2", "--out", "s.pt"], ["train-students", "--partition", "p.json", "--num-students", "2", "--out", "s.pt"], "num_students"),
    (["demo", "--students", "3", "--devices", "rpi4b:3"], ["demo", "-K", "3", "--fleet", "rpi4b:3"], "fleet"),
    (["plan", "--bundle", "b", "--devices", "rpi3b+:4", "--json", "plan.json"], ["plan", "--bundle", "b", "--fleet", "rpi3b+:4", "--out", "plan.json"], "out"),
    (["simulate", "--bundle", "b", "--devices", "rpi3b+:2"], ["simulate", "--bundle", "b", "--fleet", "rpi3b+:2"], "fleet"),
    (["train-teacher", "--out", "t.pt", "--log", "t.jsonl"], ["train-teacher", "--out", "t.pt", "--metrics", "t.jsonl"], "metrics"),
    (["infer", "--bundle", "b", "--input", "x.npy", "--tls-ca", "ca.pem", "--tls-server-name", "n"],
     ["infer", "--bundle", "b", "--input", "x.npy", "--device-tls-ca", "ca.pem", "--device-tls-server-name", "n"], "device_tls_ca"),
    (["deploy", "k8s", "--bundle", "b", "--plan", "p", "--out", "o", "--fleet", "shop"],
     ["deploy", "k8s", "--bundle", "b", "--plan", "p", "--out", "o", "--fleet-name", "shop"], "fleet_name"),
]


@pytest.mark.parametrize("old, new, dest", OLD_AND_NEW, ids=[" ".join(case[0][:2]) + f" {case[2]}" for case in OLD_AND_NEW])
def test_old_spellings_still_work_for_a_release_with_a_warning(old, new, dest, caplog):
    parser = build_parser()
    old_args, new_args = parser.parse_args(old), parser.parse_args(new)
    assert getattr(old_args, dest) == getattr(new_args, dest) is not None
    for name, value in vars(new_args).items():
        if not name.startswith("_"):
            assert getattr(old_args, name) == value, name
    from nonn.cli.deprecation import log_deprecations

    with caplog.at_level(logging.WARNING, logger="nonn.cli"):
        log_deprecations(old_args)
        log_deprecations(new_args)
    warned = [r.getMessage() for r in caplog.records]
    assert warned and all("is deprecated and will be removed in the next release: use -" in m for m in warned)
    assert len(warned) == sum(arg.startswith("--") and arg not in new for arg in old)


def test_export_refuses_an_existing_bundle_without_overwrite(tmp_path, capsys, caplog):
    out = tmp_path / "bundle"
    out.mkdir()
    assert main(["export", "--students", str(tmp_path / "s.pt"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"nonn: error: {out} already exists: pass --overwrite to replace it"
    # --no-overwrite, once the way to ask for this, is accepted with a warning and changes nothing.
    assert main(["export", "--students", str(tmp_path / "s.pt"), "--out", str(out), "--no-overwrite"]) == 2
    assert "already exists: pass --overwrite" in capsys.readouterr().err
    assert [r.getMessage() for r in caplog.records if r.name == "nonn.cli"] == [
        "--no-overwrite is deprecated and will be removed in the next release: "
        "export refuses an existing --out unless --overwrite is given"
    ]
