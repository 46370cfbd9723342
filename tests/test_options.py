"""The options system (common/options.py): one declaration gives the command line, the config keys,
the checks and the reference tables; old names still work with a warning; misspelt ones are errors."""

from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from actcache.common import options as opts_mod
from actcache.common.errors import UserError
from actcache.common.options import (command_options, configurable, from_click, from_mapping, markdown_table,
                                     option, options_of, parse_range)

ROOT = Path(__file__).resolve().parents[1]


@configurable
@dataclass
class Demo:
    batch_tokens: int = option(4096, "Tokens per step.", kind="count", unit="tokens", low=1, old_names=("batch_size",))
    repeat_epochs: bool = option(False, "Repeat the data.", old_names=("allow_repeat",))
    held_out: list[int] | None = option(None, "Sequences never read.", kind="range", default_text="none")
    mode: str = option("a", "A or b.", kind="choice", choices=("a", "b"))


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(opts_mod, "_warned", set())


def test_a_mapping_is_checked_and_old_names_warn_once(caplog):
    got = from_mapping(Demo, {"batch_size": "8k", "held_out": "10:20", "mode": "b"})
    assert got == {"batch_tokens": 8000, "held_out": [10, 20], "mode": "b"}
    assert [r.getMessage() for r in caplog.records] == [
        "warning: key 'batch_size' is deprecated and will be removed in the next release; use 'batch_tokens'"]
    assert from_mapping(Demo, {"held_out": [10, 20]}) == {"held_out": [10, 20]}  # the list form of before
    assert 'held_out = "10:20"' in caplog.records[-1].getMessage()


@pytest.mark.parametrize("raw,message", [
    ({"bach_tokens": 1}, "unknown key 'bach_tokens' in the config; did you mean 'batch_tokens'?"),
    ({"batch_tokens": 0}, "batch_tokens = 0 is out of range; it must be >= 1"),
    ({"batch_tokens": "lots"}, "batch_tokens must be a whole number"),
    ({"held_out": "20:10"}, "is empty or negative"),
    ({"held_out": "5%"}, "is not a range of sequences: write START:STOP"),
    ({"mode": "c"}, "mode must be one of a, b"),
    ({"repeat_epochs": "yes"}, "repeat_epochs must be true or false"),
])
def test_bad_values_and_unknown_keys_are_one_line_errors(raw, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("?", r"\?")):
        from_mapping(Demo, raw)


def test_the_command_line_comes_from_the_same_declaration(caplog):
    seen = []

    @click.command()
    @command_options(Demo)
    def cmd(**given):
        seen.append(Demo(**from_click(Demo, given)))

    runner = CliRunner()
    assert runner.invoke(cmd, ["--batch-tokens", "2k", "--held-out", "1:5", "--repeat-epochs"]).exit_code == 0
    assert seen[-1] == Demo(batch_tokens=2000, repeat_epochs=True, held_out="1:5")
    assert runner.invoke(cmd, ["--batch-size", "64", "--allow-repeat"]).exit_code == 0  # the old names
    assert seen[-1] == Demo(batch_tokens=64, repeat_epochs=True)
    assert {r.getMessage() for r in caplog.records} == {
        "warning: --batch-size is deprecated and will be removed in the next release; use --batch-tokens",
        "warning: --allow-repeat is deprecated and will be removed in the next release; use --repeat-epochs"}
    bad = runner.invoke(cmd, ["--batch-tokens", "0"])
    assert isinstance(bad.exception, UserError) and "--batch-tokens 0: give a positive number of tokens" in str(bad.exception)
    help_text = runner.invoke(cmd, ["--help"]).output
    assert "[unit: tokens]" in help_text and "--batch-size" not in help_text  # old names stay out of --help


def test_old_names_work_in_python_and_misspelt_ones_do_not(caplog):
    d = Demo(batch_size=8)
    assert d.batch_tokens == 8 and d.batch_size == 8
    with pytest.raises(AttributeError, match="did you mean 'batch_tokens'"):
        d.batch_tokenz = 3
    with pytest.raises(TypeError):
        Demo(batch_tokenz=3)


def test_reference_table_names_units_and_old_names():
    table = markdown_table(options_of(Demo).values())
    assert "| `--batch-tokens` (was `--batch-size`) | 4096 | tokens | count >= 1 | Tokens per step. |" in table
    assert "| `--mode` | \"a\" |  | `a` \\| `b` | A or b. |" in table


def test_parse_range():
    assert parse_range("0:128") == (0, 128)
    for bad in ("5", "a:b", "3:3", "-1:4", "1:2:3"):
        with pytest.raises(UserError):
            parse_range(bad)


def test_docs_options_md_is_the_generated_one():
    from actcache.options_reference import DOC, render

    assert DOC.read_text() == render(), "stale: run python -m actcache.options_reference --write"
