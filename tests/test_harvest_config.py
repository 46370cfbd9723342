"""HarvestConfig is the one source of the harvest options: the command line is generated from it."""

import dataclasses
import pydoc

import click
from click.testing import CliRunner

from actcache.harvest import cli as harvest_cli
from actcache.harvest.config import HarvestConfig, cli_name


def options():
    return {p.name: p for p in harvest_cli.harvest_command.params if isinstance(p, click.Option)}


def test_every_field_has_an_option_and_every_option_a_field():
    fields = {f.name: f for f in dataclasses.fields(HarvestConfig)}
    opts = options()
    assert set(fields) == set(opts)
    for name, f in fields.items():
        o = opts[name]
        assert o.help == f.metadata["help"] and o.help, name
        assert cli_name(f) in o.opts, (name, o.opts)
        assert o.required == (f.default is dataclasses.MISSING), name
        if not o.required and not o.multiple:
            assert o.default == f.default, name
    assert "--held-out" in opts["held_out"].opts and HarvestConfig(out="x", hooks=["h"]).held_out == "5%"


def test_help_and_the_python_docstring_show_the_same_options_and_text():
    text = CliRunner().invoke(harvest_cli.harvest_command, ["--help"], terminal_width=1000).output
    doc = pydoc.render_doc(HarvestConfig, renderer=pydoc.plaintext)
    for f in dataclasses.fields(HarvestConfig):
        assert cli_name(f) in text and f.metadata["help"] in text, f.name
        assert f"{f.name} ({cli_name(f)};" in doc and f.metadata["help"] in " ".join(doc.split()), f.name


def test_the_command_line_builds_the_config_python_would(monkeypatch):
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
    bad = runner.invoke(harvest_cli.harvest_command, ["--out", "o", "--hook", "a", "--tokens", "lots"])
    assert bad.exit_code == 2 and "is not a count" in bad.output
