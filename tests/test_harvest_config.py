"""HarvestConfig is the one source of the harvest options: the command line is generated from it."""

import pydoc

import click
import pytest
from click.testing import CliRunner

from actcache.common.errors import UserError
from actcache.common.options import options_of
from actcache.harvest import cli as harvest_cli
from actcache.harvest.config import HarvestConfig
from actcache.harvest.plan import validate


def options():
    """The command's options, less --quiet (the process-wide log switch every command takes)."""
    return {p.name: p for p in harvest_cli.harvest_command.params
            if isinstance(p, click.Option) and not p.hidden and p.name != "quiet"}


def test_every_field_has_an_option_and_every_option_a_field():
    specs = options_of(HarvestConfig)
    opts = options()
    assert set(specs) == set(opts)
    for name, o in specs.items():
        c = opts[name]
        assert c.help.startswith(o.help) and o.help, name
        assert o.flag_name in c.opts, (name, c.opts)
        assert c.required == o.required, name
        if not c.required and not c.multiple:
            assert c.default == o.default, name
    assert "--held-out" in opts["held_out"].opts and HarvestConfig(out="x", hooks=["h"]).held_out == "5%"
    assert "[unit: sequences]" in opts["batch_size"].help and "[unit: tokens]" in opts["context_size"].help


def test_help_and_the_python_docstring_show_the_same_options_and_text():
    text = CliRunner().invoke(harvest_cli.harvest_command, ["--help"], terminal_width=1000).output
    doc = pydoc.render_doc(HarvestConfig, renderer=pydoc.plaintext)
    for o in options_of(HarvestConfig).values():
        assert o.flag_name in text and o.help in text, o.name
        assert f"{o.name} ({o.flag_name};" in doc and o.help in " ".join(doc.split()), o.name


def test_the_command_line_builds_the_config_python_would(monkeypatch, capfd):
    got = []

    class Done:
        def summary(self):
            return "done"

    monkeypatch.setattr(harvest_cli, "harvest", lambda cfg: got.append(cfg) or Done())
    runner = CliRunner()
    r = runner.invoke(harvest_cli.harvest_command, ["--out", "o.zarr", "--hook", "a", "--hook", "b"])
    assert r.exit_code == 0 and r.output == "done\n", r.output
    assert got[0] == HarvestConfig(out="o.zarr", hooks=["a", "b"])
    runner.invoke(harvest_cli.harvest_command, ["--out", "o", "--hook", "a", "--tokens", "2k", "--no-prepend-bos",
                                                "--streaming", "--chunk-sequences", "8", "--held-out", "0",
                                                "--dtype", "bfloat16"])
    assert got[1] == HarvestConfig(out="o", hooks=["a"], tokens=2000, prepend_bos=False, streaming=True,
                                   chunk_sequences=8, held_out="0", dtype="bfloat16")
    for args, message in ((["--tokens", "lots"], "--tokens 'lots' is not a count"),
                          (["--context-size", "1"], "--context-size 1: give a value >= 2"),
                          (["--batch-size", "x"], "--batch-size 'x' is not a whole number")):
        bad = runner.invoke(harvest_cli.harvest_command, ["--out", "o", "--hook", "a", *args])
        assert isinstance(bad.exception, UserError) and message in str(bad.exception), (args, bad.output)


@pytest.mark.parametrize("change,message", [
    (dict(context_size=1), "context_size = 1 is out of range; it must be >= 2"),
    (dict(tokens="lots"), "tokens must be a whole number"),
    (dict(batch_size=0), "batch_size = 0 is out of range"),
    (dict(dtype="float8"), "dtype must be one of float32, bfloat16, float16"),
    (dict(held_out="150%"), "invalid held-out size '150%': give a percentage below 100%"),
    (dict(hooks=[]), "no hook given"),
])
def test_python_callers_get_the_same_checks(tmp_path, change, message):
    cfg = HarvestConfig(out=str(tmp_path / "o.zarr"), **{"hooks": ["h"], **change})
    with pytest.raises(UserError, match=message):
        validate(cfg)


def test_a_misspelt_attribute_is_an_error():
    cfg = HarvestConfig(out="o", hooks=["h"])
    with pytest.raises(AttributeError, match="did you mean 'batch_size'"):
        cfg.bach_size = 4
    with pytest.raises(TypeError):
        HarvestConfig(out="o", hooks=["h"], bach_size=4)
