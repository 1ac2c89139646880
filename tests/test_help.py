"""--help of every script: each flag has a description and a default, stated where the flag is declared."""
import pytest

import analyze
import bench
import evaluate
import train_stage1
import train_stage2
import train_vqgan


def flag_entries(text):
    """--help text -> {invocation: its help text}, one entry per option but -h."""
    entries, current = {}, None
    for line in text.split("\noptions:\n", 1)[1].splitlines():
        if line.startswith("  -"):
            invocation, _, current = line.strip().partition("  ")
            entries[invocation] = current = [current]
        elif line.startswith(" " * 4) and current is not None:
            current.append(line.strip())
        else:
            current = None
    return {k: " ".join(v).strip() for k, v in entries.items() if not k.startswith("-h")}


@pytest.mark.parametrize("script", [train_vqgan, train_stage1, train_stage2, evaluate, bench, analyze])
def test_help_gives_every_flag_a_description_and_a_default(script, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    entries = flag_entries(capsys.readouterr().out)
    assert len(entries) >= 5
    for invocation, help in entries.items():
        description = help.split("(default")[0]
        assert sum(c.isalpha() for c in description) >= 10, (invocation, help)
        assert "default" in help.lower(), (invocation, help)


def test_help_shows_allowed_values_and_preset_defaults(capsys):
    with pytest.raises(SystemExit):
        train_stage1.parse_args(["--help"])
    entries = flag_entries(capsys.readouterr().out)
    assert "--dataset {shapes,imagenet100,imagenet,folder}" in entries
    assert "--preset {base,semilarge,small,tiny}" in entries
    assert "(default: 1500; >= 1)" in entries["--steps STEPS"]  # the allowed range, where one exists
    assert "(default: the preset's; >= 1)" in entries["--encoder-width ENCODER_WIDTH"]
    assert "in (0, 1]" in entries["--halting-threshold HALTING_THRESHOLD"]
    assert "; list of float >= 0)" in entries["--iteration-weights A,B,..."]
