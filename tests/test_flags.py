"""Every flag of every script, given wrong values of its kind, ends in one `error:` line naming it.

The flags and what each may be are read off each script's own parser (its `parser()`: every flag's
type, a flags.Number range, a list, a path kind, a custom check, or its choices), so a new flag is
covered without editing this file; a flag whose values nothing checks fails here until it gets a kind.
"""
import argparse
import re

import pytest

import analyze
import bench
import evaluate
import flags
import train_stage1
import train_stage2
import train_vqgan

SCRIPTS = [train_vqgan, train_stage1, train_stage2, evaluate, analyze, bench]


def outside(number: flags.Number) -> list:
    """Numbers just outside a Number's range."""
    values = []
    if number.low is not None:
        values += [number.low, number.low - 1] if number.ends[0] == "(" else [number.low - 1, number.low - 0.5]
    if number.high is not None:
        values += [number.high] if number.ends[1] == ")" else [number.high + 0.5]
    return [v for v in values if number.kind is float or v == int(v)]


def text(value, kind) -> str:
    return str(int(value)) if kind is int else str(value)


def wrong_values(action, folder, file) -> list:
    """Values a flag must refuse, from what it may be."""
    kind = action.type
    if action.choices:
        return ["nonsense"]
    if isinstance(action, argparse.BooleanOptionalAction):
        return [None]  # --flag=yes
    if kind is flags.FLAG_OR_AUTO:
        return ["yes", "0"]
    if isinstance(kind, flags.Custom):
        return ["", "abc", ","]
    if isinstance(kind, flags.PathKind):
        return {"file": [str(folder)], "folder": [str(file), str(file / "below")],
                "existing folder": [str(file), str(folder / "missing")]}[kind.kind]
    if isinstance(kind, flags.Numbers):
        values = ["1,,2", "x", "1,x", ","] + ([] if kind.empty_ok else [""])
        return values + [f"1,{text(v, kind.item.kind)}" for v in outside(kind.item)]
    assert isinstance(kind, flags.Number), f"{action.option_strings[0]}: say what it may be (a type of flags.py)"
    return ["abc", ""] + [text(v, kind.kind) for v in outside(kind)] + (["1.5"] if kind.kind is int else ["nan"])


def cases():
    for script in SCRIPTS:
        for action in script.parser()._actions:
            if action.option_strings and action.help != argparse.SUPPRESS and action.dest != "help":
                yield pytest.param(script, action, id=f"{script.__name__}{action.option_strings[0]}")


@pytest.mark.parametrize("script, action", list(cases()))
def test_every_wrong_value_is_one_error_line_naming_the_flag(script, action, tmp_path, monkeypatch):
    folder, file = tmp_path / "a-folder", tmp_path / "a-file"
    folder.mkdir()
    file.write_text("not a folder")
    monkeypatch.chdir(tmp_path)
    flag = action.option_strings[0]
    for value in wrong_values(action, folder, file):
        argv = [f"{flag}=yes"] if value is None else [flag, value]
        with pytest.raises(SystemExit) as exit:
            script.parse_args(argv)
        message = str(exit.value.code)
        assert message.startswith("error: ") and "\n" not in message, (argv, message)
        assert re.search(rf"{flag}\b", message), (argv, message)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a-folder"], argv  # nothing written


@pytest.mark.parametrize("script, argv, flag", [
    (train_vqgan, ["--image-size", "33"], "--image-size"),  # not divisible by the downsampling factor
    (train_vqgan, ["--channels", "12"], "--norm-groups"),
    (train_stage1, ["--patch-size", "2"], "--patch-size"),
    (train_stage1, ["--encoder-heads", "3"], "--encoder-heads"),
    (train_stage1, ["--loss-iters", "9"], "--loss-iters"),
    (train_stage1, ["--continuous-until", "0.6", "--blend-until", "0.5"], "--blend-until"),
])
def test_the_configs_own_checks_name_the_flags(script, argv, flag):
    with pytest.raises(SystemExit) as exit:
        script.parse_args(argv)
    message = str(exit.value.code)
    assert message.startswith("error: ") and "\n" not in message and flag in message, message


def test_the_issue_examples_end_in_error_lines(tmp_path):
    """The examples that once ended in tracebacks."""
    for script, argv in [(evaluate, ["--speed-images", "0"]), (evaluate, ["--thresholds", "abc"]),
                         (train_stage1, ["--iteration-weights", "1,2,x"]), (train_vqgan, ["--image-size", "33"]),
                         (evaluate, ["--saturation", "5"]), (evaluate, ["--grid-images", "-1"])]:
        (tmp_path / "f").write_text("")
        with pytest.raises(SystemExit) as exit:
            script.parse_args(argv)
        assert str(exit.value.code).startswith(f"error: {argv[0]}"), (argv, exit.value.code)


def test_every_flag_is_checked_by_its_kind():
    """The generated test above covers every flag: none is a plain unchecked string."""
    kinds = (flags.Number, flags.Numbers, flags.PathKind, flags.Custom)
    for script in SCRIPTS:
        for action in script.parser()._actions:
            if action.option_strings and action.dest != "help" and action.help != argparse.SUPPRESS:
                assert action.choices or isinstance(action, argparse.BooleanOptionalAction) or \
                    isinstance(action.type, kinds), (script.__name__, action.option_strings)
