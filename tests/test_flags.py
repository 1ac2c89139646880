"""Every flag of every script, given wrong values of its kind, ends in one `error:` line naming it.

The flags and what each may be are read off the config dataclasses (training.field_spec: the Annotated
spec beside each field, a Literal's values, a preset table), so a new flag is covered without editing
this file; a numeric flag without a spec fails here until it gets one.
"""
import dataclasses
import re
import typing

import pytest

import analyze
import bench
import evaluate
import train_stage1
import train_stage2
import train_vqgan
import training
from model import ALITConfig
from vqgan import VQGANConfig

SCRIPTS = {train_vqgan: [train_vqgan.TrainConfig, VQGANConfig], train_stage1: [train_stage1.TrainConfig, ALITConfig],
           train_stage2: [train_stage2.TrainConfig], evaluate: [evaluate.EvalConfig],
           analyze: [analyze.AnalyzeConfig], bench: [bench.BenchConfig]}


def outside(spec: str, kind) -> list:
    """Numbers just outside a range spec (training.RANGE)."""
    match = training.RANGE.match(spec)
    if match[1]:
        bound = float(match[2])
        below = [bound - 1, bound - 0.5] if match[1] == ">=" else [bound, bound - 1]
        return [v for v in below if kind is float or v == int(v)]
    low, high = float(match[4]), float(match[5])
    return [low - 0.5 if match[3] == "[" else low, high + 0.5 if match[6] == "]" else high]


def number(value, kind) -> str:
    return str(int(value)) if kind is int else str(value)


def wrong_values(cls, f, folder, file) -> list:
    """Values a flag must refuse, from what it may be."""
    field_type, spec = training.field_spec(cls, f)
    args = [a for a in typing.get_args(field_type) if a is not type(None)]
    kind = args[0] if args and typing.get_origin(field_type) is not typing.Literal else field_type
    if typing.get_origin(field_type) is typing.Literal or f.name in ("preset", "dataset", "device", "split"):
        return ["nonsense"]
    if kind is bool:
        return [None]  # --flag=yes
    if callable(spec):
        return ["", "abc", ","]
    if spec in ("file",):
        return [str(folder)]
    if spec == "folder":
        return [str(file), str(file / "below")]
    if spec == "existing folder":
        return [str(file), str(folder / "missing")]
    assert spec is not None, f"--{f.name}: say what it may be (an Annotated spec, training.parse_flag_value)"
    spec = spec.removeprefix("auto or ")
    if spec.startswith("list of "):
        item_kind, _, item_spec = spec[len("list of "):].removesuffix(", or empty").partition(" ")
        item_kind = {"int": int, "float": float}[item_kind]
        values = ["1,,2", "x", "1,x", ","] + ([] if spec.endswith("or empty") else [""])
        return values + [f"1,{number(v, item_kind)}" for v in outside(item_spec, item_kind)] if item_spec else values
    values = ["abc", ""] + [number(v, kind) for v in outside(spec, kind)]
    return values + (["1.5"] if kind is int else ["nan"])


def cases():
    for script, classes in SCRIPTS.items():
        for cls in classes:
            for f in dataclasses.fields(cls):
                if not dataclasses.is_dataclass(f.type):
                    yield pytest.param(script, cls, f, id=f"{script.__name__}--{f.name.replace('_', '-')}")


@pytest.mark.parametrize("script, cls, f", list(cases()))
def test_every_wrong_value_is_one_error_line_naming_the_flag(script, cls, f, tmp_path, monkeypatch):
    folder, file = tmp_path / "a-folder", tmp_path / "a-file"
    folder.mkdir()
    file.write_text("not a folder")
    monkeypatch.chdir(tmp_path)
    flag = "--" + f.name.replace("_", "-")
    for value in wrong_values(cls, f, folder, file):
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
