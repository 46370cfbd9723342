"""The `actcache` command: one click group whose subcommands live beside the code they call.

Subcommands are loaded lazily, so a command imports only the stage it runs."""

from __future__ import annotations

import functools
import importlib
import os
import sys

import click

from .common.errors import UserError
from .common.progress import log, quiet_option, setup_logging

# name -> "module:attribute"; each is imported only when its command runs
SUBCOMMANDS = {
    "harvest": "actcache.harvest.cli:harvest_command",
    "info": "actcache.common.commands:info_command",
    "verify": "actcache.common.commands:verify_command",
    "train": "actcache.train.cli:train_command",
    "bench-read": "actcache.train.bench_read:bench_read_command",
    "features": "actcache.train.features_cli:features_command",
    "compare": "actcache.train.compare_cli:compare_command",
    "eval": "actcache.eval_cli:eval_command",
    "analyse": "actcache.harvest.analysis_cli:analyse_command",
    "steer": "actcache.harvest.analysis_cli:steer_command",
    "attribute": "actcache.harvest.analysis_cli:attribute_command",
    "hooks": "actcache.harvest.analysis_cli:hooks_command",
    "explore": "actcache.harvest.explore.cli:explore_command",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(SUBCOMMANDS) | set(self.commands))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = SUBCOMMANDS.get(name)
        if target is None:
            return self.commands.get(name)
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup)
@click.option("-v", "--verbose", is_flag=True, help="More log lines on stderr (and tracebacks on error).")
@functools.partial(quiet_option, top=True)
@click.version_option(package_name="actcache")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Harvest language-model activations once; train many sparse autoencoders from them."""
    setup_logging(verbose)
    ctx.obj = {"verbose": verbose, "load_unembedding": load_unembedding}


def load_unembedding(model_spec: str, tokenizer_spec: str | None = None):
    """(W_U [d_model, d_vocab], tokenizer) of a model spec, for store-side commands that show logit
    effects and token strings: train/ never imports harvest/, so the top layer loads the model."""
    from .harvest.models import load_model, load_tokenizer

    m = load_model(model_spec, device="cpu")
    tok = m.tokenizer
    if tok is None and tokenizer_spec:
        try:
            tok = load_tokenizer(tokenizer_spec)
        except UserError as e:
            log.warning(f"token ids instead of strings: {e}")
    return m.tl.W_U.detach().float(), tok


@cli.command("demo")
@click.option("--out", default="demo", show_default=True, help="Folder for the store (acts.zarr) and the sweep.")
@click.option("--tokens", default="40960", show_default=True, help="Tokens to harvest, e.g. 100k.")
def demo_command(out: str, tokens: str) -> None:
    """The offline default: harvest the bundled SmolLM2-135M over the Python standard library's
    sources, train a small sweep of SAEs on it, evaluate them with the model on held-out tokens, and
    print what was written and the results."""
    import json
    from pathlib import Path

    from .common.outputs import SUMMARY_FILE
    from .common.progress import parse_count
    from .demo import run_demo
    from .train.export import summary_table

    r = run_demo(out, parse_count(tokens))
    click.echo(r["harvest"].summary())
    click.echo("")
    if r["eval"]:  # the sweep's summary with the held-out columns merged in
        click.echo(summary_table(json.loads((Path(out) / "sweep" / SUMMARY_FILE).read_text())))
        s = r["eval"][0]["sequences_scored"]
        click.echo(f"\n(held-out sequences {s['start_sequence']}:{s['stop_sequence']} of the store, "
                   f"{r['eval'][0]['ce_tokens']} token positions scored)")
    else:
        click.echo(summary_table(r["summary"]))
    click.echo(f"\nSAELens folders with eval.json, summary.json, summary.md, frontier.png and frontier_ce.png "
               f"in {out}/sweep")


def main() -> None:
    """Entry point: user errors become one line on stderr and a non-zero exit, no traceback."""
    try:
        cli.main(standalone_mode=False)
    except UserError as e:
        if getattr(e, "quiet", False):  # another rank of a torchrun job failed; its rank 0 says why
            sys.exit(e.exit_code)
        if "-v" in sys.argv or "--verbose" in sys.argv or os.environ.get("ACTCACHE_DEBUG"):
            raise
        click.echo(f"actcache: error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort as e:
        # click turns Ctrl-C (KeyboardInterrupt) into Abort; say what to do about it
        if isinstance(e.__cause__ or e.__context__, KeyboardInterrupt):
            _interrupted()
        click.echo("actcache: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    except OSError as e:
        import errno

        if e.errno == errno.ENOSPC:
            hint = "rerun with --resume" if _command() in RESUMABLE else "rerun the same command"
            click.echo(f"actcache: error: no space left on the device; free some space and {hint}", err=True)
            sys.exit(3)
        raise


RESUMABLE = ("harvest", "train")  # the commands that take --resume


def _command() -> str | None:
    return next((a for a in sys.argv[1:] if not a.startswith("-")), None)


def _interrupted() -> None:
    hint = "; rerun with --resume to continue" if _command() in RESUMABLE else ""
    click.echo(f"actcache: interrupted{hint}", err=True)
    sys.exit(130)


if __name__ == "__main__":
    main()
