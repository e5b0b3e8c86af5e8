"""`rnnlm bench --help` shows every flag's default, and says what an unset one means."""

import argparse
import re

import pytest

from rnnlm_ext import benchmark
from rnnlm_ext.lm.cli import main


def bench_actions():
    """The options `rnnlm bench` takes, as argparse holds them (the flags and their defaults)."""
    parser = argparse.ArgumentParser()
    benchmark.add_arguments(parser)
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


@pytest.mark.parametrize("action", bench_actions(), ids=lambda a: a.option_strings[0])
def test_bench_help_shows_every_default(action, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines; the words stay
    assert not re.search(r"\bissue", text, re.IGNORECASE), text  # the help stands on its own
    flag = action.option_strings[0]
    entry = re.search(rf"(?<= ){re.escape(flag)}\b(.*?)(?= --[a-z]|$)", text.split("options:")[1]).group(1)
    assert f"(default: {action.default})" in entry, entry
    if action.default is None:  # "None" alone would not say what happens
        assert "unset: " in entry, entry
